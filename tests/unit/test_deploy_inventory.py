"""Reading inventories: pairs, host specs and the errors that name the file and host."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from kemari_suite.deploy import inventory
from kemari_suite.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, hosts: dict[str, dict[str, Any]], **group_vars: Any) -> Path:
    path = tmp_path / "hosts.yml"
    data = {"all": {"children": {"kemari": {"hosts": hosts, "vars": group_vars}}}}
    path.write_text(yaml.safe_dump(data))
    return path


PAIR: dict[str, dict[str, Any]] = {
    "a": {"kemari_role": "primary", "ansible_host": "192.0.2.1", "ansible_port": 2222},
    "b": {"kemari_role": "secondary", "ansible_host": "192.0.2.2"},
}


def test_a_yaml_pair_with_group_vars(tmp_path: Path) -> None:
    inv = write(
        tmp_path,
        PAIR,
        ansible_user="ops",
        ansible_ssh_private_key_file="~/.ssh/kemari",
        ansible_ssh_common_args="-o UserKnownHostsFile=/etc/kemari/known_hosts -C",
        kemari_root="/srv/k/",
    )
    pair = inventory.load(inv).pair()
    assert pair.group == "kemari"
    p, s = pair.primary, pair.secondary
    assert (p.name, p.address, p.port, p.user) == ("a", "192.0.2.1", 2222, "ops")
    assert (s.name, s.address, s.port) == ("b", "192.0.2.2", 22)
    assert p.key_file == Path("~/.ssh/kemari").expanduser()
    assert p.known_hosts == Path("/etc/kemari/known_hosts")
    assert p.prefix == "/srv/k" and p.config_path == "/srv/k/etc/kemari/kemari.toml"
    assert p.command == "/srv/k/opt/kemari/bin/kemari"
    assert (p.unit, s.unit) == ("kemari-protect.service", "kemari-standby.service")


def test_an_ini_inventory_with_two_pairs(tmp_path: Path) -> None:
    inv = tmp_path / "hosts.ini"
    inv.write_text(
        "[pair1]\n"
        "h1 kemari_role=primary\nh2 kemari_role=secondary kemari_known_hosts=/kh\n"
        "[pair2]\n"
        "h3 kemari_role=secondary ansible_become=true\nh4 kemari_role=primary\n"
        "[pair1:vars]\nkemari_pair_group=pair1\n"
        "[pair2:vars]\nkemari_pair_group=pair2\n"
        "[kemari:children]\npair1\npair2\n"
    )
    loaded = inventory.load(inv)
    assert [p.group for p in loaded.pairs()] == ["pair1", "pair2"]
    two = loaded.pair("pair2")
    assert (two.primary.name, two.secondary.name) == ("h4", "h3")
    assert two.secondary.become and not two.primary.become
    assert loaded.pair("pair1").secondary.known_hosts == Path("/kh")
    with pytest.raises(ConfigError, match="2 pairs"):
        loaded.pair()
    with pytest.raises(ConfigError, match="no pair 'pair3'"):
        loaded.pair("pair3")


@pytest.mark.parametrize(
    ("hosts", "match"),
    [
        ({"a": PAIR["a"]}, "holds 1 host"),
        ({"a": PAIR["a"], "b": {"kemari_role": "primary"}}, "both hosts are primary"),
        ({"a": PAIR["a"], "b": {}}, r"b\.kemari_role: missing"),
        ({"a": PAIR["a"], "b": {"kemari_role": "backup"}}, r"b\.kemari_role: must be primary"),
        ({"a": PAIR["a"], "b": {**PAIR["b"], "ansible_port": "ssh"}}, r"b\.ansible_port"),
        ({"a": PAIR["a"], "b": {**PAIR["b"], "kemari_root": "rel"}}, r"b\.kemari_root"),
    ],
)
def test_malformed_pairs_name_the_file_and_host(
    hosts: dict[str, dict[str, Any]], match: str
) -> None:
    # What ansible-inventory --list prints for such a file (load() is tested above).
    data = {"_meta": {"hostvars": hosts}, "kemari": {"hosts": list(hosts)}}
    inv = inventory.from_list_json(data, Path("site/hosts.yml"))
    with pytest.raises(ConfigError, match=match) as info:
        inv.pairs()
    assert info.value.path == "site/hosts.yml"


def test_no_kemari_group() -> None:
    inv = inventory.from_list_json({"web": {"hosts": ["w1"]}}, Path("hosts.ini"))
    with pytest.raises(ConfigError, match="no hosts in group 'kemari'"):
        inv.pairs()


def test_unparsable_and_missing_inventories(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text("all:\n  children: [\n")
    with pytest.raises(ConfigError) as info:
        inventory.load(bad)
    assert info.value.path == str(bad)
    assert "not a valid inventory" in str(info.value) and "YAML" in str(info.value)
    with pytest.raises(ConfigError, match="inventory not found"):
        inventory.load(tmp_path / "missing.yml")


def test_parse_error_keeps_the_useful_lines() -> None:
    stderr = (
        "[WARNING]: Failed to parse inventory with 'yaml' plugin: YAML parsing failed: oops\n"
        "Origin: /x/hosts.yml:3:5\n"
        "[WARNING]: Failed to parse inventory with 'ini' plugin: Invalid section entry\n"
        "[ERROR]: No inventory was parsed\n"
    )
    assert inventory.parse_error(stderr) == (
        "as YAML: YAML parsing failed: oops; as INI: Invalid section entry (at /x/hosts.yml:3:5)"
    )
    assert inventory.parse_error("[ERROR]: boom\n") == "boom"
    assert inventory.parse_error("") == "-"


def test_from_list_json_flattens_child_groups() -> None:
    data = {
        "_meta": {"hostvars": {"a": {"kemari_role": "primary"}}},
        "all": {"children": ["kemari", "ungrouped"]},
        "kemari": {"children": ["p1"]},
        "p1": {"hosts": ["a", "b"]},
    }
    inv = inventory.from_list_json(data, Path("inv"))
    assert inv.groups["kemari"] == ("a", "b") and inv.groups["all"] == ("a", "b")
    assert inv.hostvars["b"] == {}


def test_python_defaults_match_the_role_defaults() -> None:
    defaults = yaml.safe_load((REPO / "playbooks/roles/kemari/defaults/main.yml").read_text())
    assert defaults["kemari_root"] == inventory.DEFAULT_ROOT
    assert defaults["kemari_venv"] == inventory.DEFAULT_VENV
    assert defaults["kemari_host_python"] == inventory.DEFAULT_HOST_PYTHON
    assert defaults["kemari_pair_group"] == inventory.KEMARI_GROUP
    unit_expr = defaults["kemari_agent_unit"]
    assert "protect" in unit_expr and "standby" in unit_expr


def test_cli_reports_a_malformed_inventory(tmp_path: Path) -> None:
    from kemari_suite.cli import deploy, remote

    bad = tmp_path / "bad.yml"
    bad.write_text("all:\n  children: [\n")
    runner = CliRunner()
    for app, args in ((deploy.app, []), (remote.app, ["status"])):
        res = runner.invoke(app, [*args, "-i", str(bad)], env={"COLUMNS": "300"})
        assert res.exit_code == 2, res.output
        assert str(bad) in res.output and "not a valid inventory" in res.output
