"""The inventory's VM list, planned per host: ports, units, configs, clashes refused;
and the template units rendered and checked (systemd-analyze verify where present)."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from kemari_suite.config import KemariConfig, build
from kemari_suite.deploy import vms
from kemari_suite.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "playbooks/roles/kemari/templates/kemari-agent@.service.j2"
PAIR = [
    {"host": "a", "address": "10.0.0.1", "node_name": "na", "drbd_disk": ""},
    {"host": "b", "address": "10.0.0.2"},
]
SHARED: dict[str, Any] = {
    "vm": {"memory_mib": 128},
    "replication": {"tiebreaker": "witness", "witness": "10.0.1.1:7411"},
    "disk": {"backend": "drbd"},
    "config": {"paths": {"run_dir": "/run/kemari"}},
    "drbd": {"resource": "kemari0", "disk": "/dev/vg/x", "minor": 3},
}
KEYS = {"key_file": "/etc/kemari/replication.key", "witness_key_file": "/etc/kemari/w.key"}


def plan(items: list[dict[str, Any]], host: str = "a") -> list[vms.PlannedVM]:
    return vms.plan(
        items,
        host=host,
        pair=PAIR,
        default_primary="a",
        shared=SHARED,
        repl_port=7410,
        drbd_port=7789,
        keys=KEYS,
        source="hosts.yml",
    )


def test_ports_units_and_configs_from_the_list() -> None:
    items = [{"name": "web"}, {"name": "db", "primary": "b"}, {"name": "app", "repl_port": 7500}]
    on_a, on_b = plan(items, "a"), plan(items, "b")
    assert [(p.name, p.role, p.unit) for p in on_a] == [
        ("web", "primary", "kemari-protect@web.service"),
        ("db", "secondary", "kemari-standby@db.service"),
        ("app", "primary", "kemari-protect@app.service"),
    ]
    assert [p.unit for p in on_b] == [
        "kemari-standby@web.service",
        "kemari-protect@db.service",
        "kemari-standby@app.service",
    ]
    assert [p.other_unit for p in on_a][1] == "kemari-protect@db.service"
    assert [p.repl_port for p in on_a] == [7410, 7411, 7500]
    assert [p.drbd_port for p in on_a] == [7789, 7790, 7791]
    assert [p.drbd_minor for p in on_a] == [3, 4, 5]
    assert len({p.mac for p in on_a}) == 3 and on_a[0].mac == vms.mac_for("web")
    assert on_a[0].config_path == "/etc/kemari/vms/web.toml"
    web_a, db_a = on_a[0], on_a[1]
    rep = web_a.tree["replication"]
    assert rep["listen"] == "10.0.0.1:7410" and rep["peer"] == "10.0.0.2:7410"
    assert rep["key_file"] == KEYS["key_file"] and rep["tiebreaker"] == "witness"
    assert web_a.tree["paths"] == {"run_dir": "/run/kemari"}
    # Every planned tree is a config the agent loads.
    cfg = build(KemariConfig, web_a.tree)
    assert cfg.vm.name == "web" and cfg.replication.witness_key_file == KEYS["witness_key_file"]
    # DRBD: named after the VM, node 0 on its primary.
    assert db_a.drbd["resource"] == "db"
    assert [n["name"] for n in db_a.drbd_nodes] == ["b", "na"]
    assert {n["port"] for n in db_a.drbd_nodes} == {7790}


def test_single_vm_sections_override_the_shared_ones() -> None:
    (p,) = plan([{"name": "x", "vm": {"mac": "52:54:00:aa:bb:cc"}, "drbd": {"minor": 9}}])
    assert p.tree["vm"] == {"memory_mib": 128, "name": "x", "mac": "52:54:00:aa:bb:cc"}
    assert p.drbd_minor == 9 and p.drbd["disk"] == "/dev/vg/x"


@pytest.mark.parametrize(
    ("items", "key", "words"),
    [
        ([{"name": "a"}, {"name": "a"}], "kemari_vms[1].name", "also"),
        ([{"name": "bad/name"}], "kemari_vms[0].name", "letters"),
        ([{}], "kemari_vms[0].name", "letters"),
        ([{"name": "x", "primary": "c"}], "kemari_vms[0].primary", "not a host"),
        ([{"name": "x", "colour": 1}], "kemari_vms[0]", "unknown"),
        ([{"name": "x"}, {"name": "y", "repl_port": 7410}], "kemari_vms[1].repl_port", "7410"),
        ([{"name": "x"}, {"name": "y", "drbd": {"minor": 3}}], "kemari_vms[1].drbd.minor", "3"),
        ([{"name": "x", "repl_port": 70000}], "kemari_vms[0].repl_port", "not a TCP port"),
    ],
)
def test_clashes_and_mistakes_are_refused(
    items: list[dict[str, Any]], key: str, words: str
) -> None:
    with pytest.raises(ConfigError) as info:
        plan(items)
    assert info.value.key == key and words in str(info.value)
    assert "hosts.yml" in str(info.value)


def render_unit(role: str, venv: Path) -> str:
    import jinja2

    text = TEMPLATE.read_text()
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    command = "protect" if role == "primary" else "standby"
    unit = f"kemari-{command}@.service"
    return env.from_string(text).render(
        ansible_managed="managed",
        item={"role": role, "command": command, "unit": unit},
        kemari_venv=str(venv),
        kemari_watchdog_sec=30,
        kemari_start_timeout="infinity",
    )


@pytest.mark.parametrize("role", ["primary", "secondary"])
def test_template_units(role: str, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    kemari = venv / "bin/kemari"
    kemari.write_text("#!/bin/sh\n")
    kemari.chmod(0o755)
    text = render_unit(role, venv)
    parser = configparser.ConfigParser(strict=True, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(text)
    service = parser["Service"]
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    assert service["WatchdogSec"] == "30" and service["TimeoutStartSec"] == "infinity"
    assert service["Restart"] == ("no" if role == "primary" else "on-failure")
    command = "protect" if role == "primary" else "standby"
    assert service["ExecStart"] == f"{kemari} {command} -c /etc/kemari/vms/%i.toml"
    assert parser["Install"]["WantedBy"] == "multi-user.target"
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return
    unit = tmp_path / f"kemari-{command}@web.service"
    unit.write_text(text)
    proc = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # Only this unit's own complaints count (the host's other units are not ours).
    ours = [line for line in proc.stderr.splitlines() if unit.name in line]
    assert not ours, proc.stderr


def test_the_ansible_filter_returns_plain_dicts() -> None:
    import importlib.util

    from ansible.errors import AnsibleFilterError

    path = REPO / "playbooks" / "filter_plugins" / "kemari.py"
    spec = importlib.util.spec_from_file_location("kemari_filters_vms", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fn = module.FilterModule().filters()["kemari_vm_plan"]
    args: dict[str, Any] = {
        "host": "b",
        "pair": PAIR,
        "default_primary": "a",
        "shared": SHARED,
        "repl_port": 7410,
        "drbd_port": 7789,
        "keys": KEYS,
    }
    (web,) = fn([{"name": "web"}], source="inv", **args)
    assert web["unit"] == "kemari-standby@web.service" and web["tree"]["vm"]["name"] == "web"
    assert fn([], **args) == []
    with pytest.raises(AnsibleFilterError, match=r"kemari_vms: inv: kemari_vms\[0\]\.name"):
        fn([{"name": ""}], source="inv", **args)
