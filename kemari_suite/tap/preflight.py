"""``kemari check``: is a configuration (and a VM definition) sound, without starting
anything?

:func:`preflight` loads the agent configuration and the VM definition, audits the guest's
outputs (:func:`kemari_suite.tap.outputs.audit_outputs`: the audit protect runs before
QEMU starts), and checks the keys (present, at least 32 bytes, key files readable by
their owner alone). It collects every problem instead of stopping at the first, and
returns a :class:`CheckReport`; accepted unprotected outputs are warnings.

``check_files=False`` checks what the text alone says (no key file, disk or kernel is
read, no QEMU asked for its machine types): how the documentation's examples are checked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kemari_suite import config as configmod
from kemari_suite.config import KemariConfig
from kemari_suite.errors import ConfigError
from kemari_suite.protocol.keys import check_key_length, load_replication_key, read_key_file
from kemari_suite.tap.outputs import audit_outputs
from kemari_suite.vm.machines import MachineProbe, qemu_machines


@dataclass(frozen=True)
class CheckReport:
    """What ``kemari check`` found: ``ok`` when there is no error."""

    config: str | None
    vm: str | None
    errors: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.errors

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "errors": list(self.errors),
            "warnings": list(self.warnings),
            "config": self.config,
            "vm": self.vm,
        }


@dataclass
class _Findings:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def attempt(self, fn: Callable[[], object], *, prefix: str = "") -> bool:
        """Run ``fn``; a ConfigError becomes an error line. True when it passed."""
        try:
            fn()
        except ConfigError as err:
            self.errors.append(f"{prefix}{err}")
            return False
        return True


def check_keys(cfg: KemariConfig, into: _Findings, *, check_files: bool, prefix: str = "") -> None:
    """The replication key (and the witness key, with the witness as tiebreaker)."""
    r = cfg.replication
    if check_files:
        into.attempt(lambda: load_replication_key(cfg), prefix=prefix)
    elif r.key_file and r.key:
        into.errors.append(f"{prefix}replication.key: set replication.key_file or key, not both")
    elif r.key:
        into.attempt(
            lambda: check_key_length(r.key.encode("utf-8"), what="replication.key"),
            prefix=prefix,
        )
    elif not r.key_file:
        into.errors.append(
            f"{prefix}replication.key_file: no replication key (`kemari key generate -o FILE` "
            "writes one)"
        )
    if r.tiebreaker != "witness":
        return
    if not r.witness_key_file:
        into.warnings.append(
            f"{prefix}replication.witness_key_file is not set: give the pair its own key "
            "at the witness, never the replication key"
        )
    elif check_files:
        into.attempt(
            lambda: read_key_file(r.witness_key_file, what="replication.witness_key_file"),
            prefix=prefix,
        )


def check_config(
    cfg: KemariConfig, into: _Findings, *, check_files: bool, prefix: str = ""
) -> None:
    """Outputs and keys of one host's configuration."""
    audit = audit_outputs(cfg)
    into.errors += [f"{prefix}untapped output: {f.describe()}" for f in audit.refused]
    into.warnings += [f"{prefix}unprotected output: {f.describe()}" for f in audit.accepted]
    check_keys(cfg, into, check_files=check_files, prefix=prefix)


def check_definition(
    path: Path,
    into: _Findings,
    *,
    host: str | None,
    check_files: bool,
    machines: MachineProbe | None,
) -> None:
    """Parse a VM definition, then audit ``host``'s share of it."""
    from kemari_suite.vm.vmdef import check_warnings, load_vmdef

    try:
        defn = load_vmdef(path, host=host, machines=machines, check_files=check_files)
    except ConfigError as err:
        into.errors.append(str(err))
        return
    into.warnings += check_warnings(defn)
    # Without a host, the first one stands for both: outputs and keys are written once,
    # at the top level (per-host sections change only paths and names).
    name = host or defn.host_names[0]
    prefix = f"hosts.{host}: " if host else ""
    view = defn.for_host(name, resolve_accel=lambda a: (a, "not resolved by check"))
    audit = audit_outputs(view.config, view.spec, accepted=defn.unprotected_outputs(name))
    into.errors += [f"{prefix}untapped output: {f.describe()}" for f in audit.refused]
    into.warnings += [f"{prefix}unprotected output: {f.describe()}" for f in audit.accepted]
    check_keys(view.config, into, check_files=check_files, prefix=prefix)


def preflight(
    config: Path | None,
    vm: Path | None = None,
    *,
    host: str | None = None,
    check_files: bool = True,
    machines: MachineProbe | None = qemu_machines,
) -> CheckReport:
    """Check ``config`` (an agent configuration) and ``vm`` (a VM definition), at least one
    of them, without starting anything; every problem found is in the report.

    ``host`` checks the definition as that host sees it (its files, its keys); ``machines``
    lists this QEMU's machine types (None: only the form is checked).
    """
    found = _Findings()
    if config is None and vm is None:
        found.errors.append("nothing to check: give a config (-c) or a VM definition (--vm)")
    if config is not None:
        try:
            cfg = configmod.load(config)
        except ConfigError as err:
            found.errors.append(str(err))
        else:
            check_config(cfg, found, check_files=check_files)
    if vm is not None:
        check_definition(vm, found, host=host, check_files=check_files, machines=machines)
    return CheckReport(
        config=str(config) if config is not None else None,
        vm=str(vm) if vm is not None else None,
        errors=tuple(found.errors),
        warnings=tuple(dict.fromkeys(found.warnings)),
    )


__all__ = ["CheckReport", "check_config", "check_definition", "check_keys", "preflight"]
