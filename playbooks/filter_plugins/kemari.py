"""Ansible filters that render Kemari files with the suite's own code.

``kemari_config`` turns a tree of sections into ``kemari.toml`` after checking it as the
agent will (:func:`kemari_suite.deploy.render.render_config`); ``kemari_drbd_resource``
produces the DRBD resource file with the disk layer's renderer
(:func:`kemari_suite.deploy.render.render_drbd`); ``kemari_vm_plan`` allocates ports,
units and configs for the inventory's ``kemari_vms`` list
(:func:`kemari_suite.deploy.vms.plan`). All run on the controller.

The controller's Python must be able to import ``kemari_suite``: run Ansible from the
suite's virtual environment (``kemari deploy`` does), or from anywhere with the
checkout these playbooks live in, which is put on the path as a fallback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ansible.errors import AnsibleFilterError

_CHECKOUT = Path(__file__).resolve().parents[2]


def _render() -> Any:
    try:
        from kemari_suite.deploy import render
    except ImportError:
        if (_CHECKOUT / "kemari_suite").is_dir() and str(_CHECKOUT) not in sys.path:
            sys.path.append(str(_CHECKOUT))
        try:
            from kemari_suite.deploy import render
        except ImportError as err:
            raise AnsibleFilterError(
                f"cannot import kemari_suite ({err}); run Ansible from the Kemari Suite "
                "virtual environment (e.g. `kemari deploy`) or pip install the checkout"
            ) from err
    return render


def _plain(value: Any) -> Any:
    """Ansible's tagged and lazy containers as plain dicts, lists and scalars."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    return value


def kemari_config(tree: Any, source: str | None = None) -> str:
    """The text of kemari.toml for ``tree`` (a mapping of sections)."""
    render = _render()
    from kemari_suite.errors import KemariError

    try:
        return str(render.render_config(_plain(tree), source=source))
    except KemariError as err:
        raise AnsibleFilterError(f"kemari.toml: {err}") from err


def kemari_drbd_resource(
    drbd: Any, nodes: Any, source: str | None = None, module_version: str = ""
) -> str:
    """The text of the DRBD resource file for ``drbd`` and the pair's ``nodes``, in the
    dialect of the host's DRBD module (``module_version``: 8.x renders 8.4's)."""
    render = _render()
    from kemari_suite.errors import KemariError

    try:
        dialect = render.drbd_dialect(str(module_version or ""))
        return str(render.render_drbd(_plain(drbd), _plain(nodes), source=source, dialect=dialect))
    except KemariError as err:
        raise AnsibleFilterError(f"DRBD resource: {err}") from err
    except ImportError as err:
        raise AnsibleFilterError(f"DRBD resource: the disk layer is not importable: {err}") from err


def kemari_vm_plan(vms: Any, source: str | None = None, **kw: Any) -> list[dict[str, Any]]:
    """The inventory's ``kemari_vms`` as this host runs them (ports, units, configs):
    :func:`kemari_suite.deploy.vms.plan`."""
    _render()  # puts the checkout on the path when needed
    from kemari_suite.deploy import vms as vmsmod
    from kemari_suite.errors import KemariError

    args = {k: _plain(v) for k, v in kw.items()}
    try:
        planned = vmsmod.plan(_plain(vms or []), source=source, **args)
    except KemariError as err:
        raise AnsibleFilterError(f"kemari_vms: {err}") from err
    return [p.to_dict() for p in planned]


class FilterModule:
    """Kemari Suite filters."""

    def filters(self) -> dict[str, Any]:
        return {
            "kemari_config": kemari_config,
            "kemari_drbd_resource": kemari_drbd_resource,
            "kemari_vm_plan": kemari_vm_plan,
        }
