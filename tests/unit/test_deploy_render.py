"""Rendering kemari.toml and DRBD resource files for the playbooks, and the Ansible
filters that call these renderers."""

from __future__ import annotations

import importlib.util
import math
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

from kemari_suite import config as configmod
from kemari_suite.deploy import render
from kemari_suite.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
NODES = [
    {"name": "kpri", "address": "172.16.0.1", "node_id": 0, "port": 7789},
    {"name": "ksec", "address": "172.16.0.2", "node_id": 1, "port": 7789},
]


def test_toml_values_round_trip() -> None:
    tree: dict[str, dict[str, object]] = {
        "vm": {"name": "web1", "memory_mib": 256, "append": 'console=ttyS0 quote" back\\ tab\t'},
        "image": {"add": ["a:/b", "é:/ü"]},
        "replication": {"pipelining": False, "key": "k\n\x01"},
        "odd": {"needs quotes": 1.5},
    }
    text = render.to_toml(tree, header="two\nlines")
    assert text.startswith("# two\n# lines\n")
    assert tomllib.loads(text) == tree


def test_toml_orders_sections_like_the_config_and_skips_empty_ones() -> None:
    text = render.to_toml({"disk": {"backend": "drbd"}, "tap": {}, "vm": {"name": "x"}})
    assert text.index("[vm]") < text.index("[disk]") and "[tap]" not in text


@pytest.mark.parametrize("bad", [None, {"a": 1}, math.inf, object()])
def test_toml_rejects_values_it_cannot_write(bad: object) -> None:
    with pytest.raises(ConfigError) as info:
        render.to_toml({"vm": {"name": bad}})
    assert info.value.key == "vm.name"


def test_render_config_is_loadable_by_the_agent(tmp_path: Path) -> None:
    text = render.render_config(
        {
            "vm": {"name": "web1", "memory_mib": 512},
            "replication": {
                "key": "s3cret-pre-shared-key-of-32-bytes-or-more",
                "peer": "172.16.0.2:7410",
                "tiebreaker": "witness",
                "witness": "10.0.0.1:7411",
            },
            "disk": {"backend": "drbd"},
            "paths": {"run_dir": "/run/kemari"},
            "tap": {},
            "lab": None,
        }
    )
    path = tmp_path / "kemari.toml"
    path.write_text(text)
    cfg = configmod.load(path)
    assert cfg.vm.memory_mib == 512 and cfg.replication.witness == "10.0.0.1:7411"
    assert cfg.paths.run_dir == Path("/run/kemari") and cfg.disk.backend == "drbd"


@pytest.mark.parametrize(
    ("tree", "key"),
    [
        ({"vm": {"nmae": "x"}}, "vm.nmae"),
        ({"vm": {"memory_mib": "lots"}}, "vm.memory_mib"),
        ({"replication": {"tiebreaker": "witness"}}, "replication.witness"),
        ({"bogus": {"a": 1}}, "bogus"),
        ({"vm": ["not", "a", "table"]}, "vm"),
    ],
)
def test_render_config_names_the_bad_key(tree: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        render.render_config(tree, source="inventory.yml")
    assert info.value.key == key
    assert str(info.value).startswith(f"inventory.yml: {key}: ")


def test_render_drbd_uses_the_disk_layer() -> None:
    from kemari_suite.disk.drbd import drbd_config_from_dict, render_resource

    text = render.render_drbd({"resource": "web1", "disk": "/dev/vg/web1", "minor": 2}, NODES)
    expected = render_resource(
        drbd_config_from_dict(
            {"resource": "web1", "disk": "/dev/vg/web1", "minor": 2, "nodes": NODES}
        )
    )
    assert text == expected
    assert "on kpri {" in text and "address ipv4 172.16.0.2:7789;" in text
    assert "device minor 2;" in text and "protocol C;" in text


@pytest.mark.parametrize(
    "version,dialect",
    [("8.4.11", "8.4"), ("8.4.11 (api:1/proto:86-101)", "8.4"), ("9.2.12", "9"), ("", "9")],
)
def test_the_host_module_chooses_the_dialect(version: str, dialect: str) -> None:
    assert render.drbd_dialect(version) == dialect


@pytest.mark.skipif(not Path("/usr/lib/drbd/drbdadm-84").exists(), reason="no drbdadm-84")
def test_the_filter_renders_what_an_84_host_accepts(tmp_path: Path) -> None:
    """Debian's kernels carry DRBD 8.4: the playbooks render its dialect there, which
    drbdadm-84 (what drbdadm runs once the 8.4 module is loaded) accepts; DRBD 9's it
    refuses."""
    import os
    import subprocess

    filters = load_filters()
    drbd = {"resource": "web1", "disk": "/dev/vg/web1", "minor": 2}
    for version, accepted in (("8.4.11", True), ("9.2.12", False)):
        res = tmp_path / f"web1-{version}.res"
        res.write_text(filters.kemari_drbd_resource(drbd, NODES, module_version=version))
        done = subprocess.run(
            ["/usr/lib/drbd/drbdadm-84", "-c", str(res), "-d", "up", "web1"],
            capture_output=True, text=True, check=False,
            env={**os.environ, "__DRBD_NODE__": "kpri", "LC_ALL": "C"},
        )  # fmt: skip
        assert (done.returncode == 0) is accepted, (version, done.stderr)


def test_render_drbd_refuses_nodes_from_the_inventory_and_bad_values() -> None:
    with pytest.raises(ConfigError, match="nodes come from"):
        render.render_drbd({"resource": "r", "disk": "/dev/x", "nodes": []}, NODES)
    with pytest.raises(ConfigError) as info:
        render.render_drbd(
            {"resource": "r", "disk": "/dev/x"}, [NODES[0], {**NODES[1], "node_id": 0}]
        )
    assert "node_id" in str(info.value)


def load_filters() -> ModuleType:
    path = REPO / "playbooks" / "filter_plugins" / "kemari.py"
    spec = importlib.util.spec_from_file_location("kemari_filters", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ansible_filters_wrap_the_renderers() -> None:
    from ansible.errors import AnsibleFilterError

    filters = load_filters().FilterModule().filters()
    assert set(filters) == {"kemari_config", "kemari_drbd_resource", "kemari_vm_plan"}
    text = filters["kemari_config"]({"vm": {"name": "web1"}, "disk": {}})
    assert tomllib.loads(text) == {"vm": {"name": "web1"}}
    res = filters["kemari_drbd_resource"]({"resource": "web1", "disk": "/dev/x"}, NODES)
    assert "resource web1 {" in res
    with pytest.raises(AnsibleFilterError, match=r"kemari\.toml: inv: vm\.vcpus"):
        filters["kemari_config"]({"vm": {"vcpus": 0}}, source="inv")
    with pytest.raises(AnsibleFilterError, match="DRBD resource"):
        filters["kemari_drbd_resource"]({"resource": "all", "disk": "/dev/x"}, NODES)
