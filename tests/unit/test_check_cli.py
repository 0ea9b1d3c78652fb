"""`kemari check -c CONFIG [--vm DEF] [--json]`: validate without starting anything."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer
from typer.testing import CliRunner

from kemari_suite.cli import check as check_cli

app = typer.Typer()
app.command()(check_cli.check)
runner = CliRunner()


def key_file(tmp_path: Path, *, mode: int = 0o600, size: int = 64, name: str = "k.key") -> Path:
    p = tmp_path / name
    p.write_text("a" * size + "\n")
    os.chmod(p, mode)
    return p


def write(tmp_path: Path, text: str, name: str = "kemari.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def good_config(tmp_path: Path, extra: str = "") -> Path:
    key = key_file(tmp_path)
    return write(
        tmp_path,
        f"""
[vm]
name = "web1"
{extra}
[tap]
host_tap = "tap0"
[replication]
key_file = "{key}"
peer = "192.0.2.2:7410"
""",
    )


def test_a_sound_config_is_ok(tmp_path: Path) -> None:
    res = runner.invoke(app, ["-c", str(good_config(tmp_path))])
    assert res.exit_code == 0, res.output
    assert "ok" in res.stdout


def test_every_reason_is_given_and_the_exit_is_non_zero(tmp_path: Path) -> None:
    cfg = write(
        tmp_path,
        """
[vm]
netdev = "tap,ifname=tap0,script=no,downscript=no"
[replication]
key = "short"
""",
    )
    res = runner.invoke(app, ["-c", str(cfg), "--json"])
    assert res.exit_code != 0
    doc = json.loads(res.stdout)
    assert doc["ok"] is False
    assert doc["config"] == str(cfg) and doc["vm"] is None
    text = " ".join(doc["errors"])
    assert "vm.netdev" in text and "tap.host_tap" in text
    assert "replication.key" in text and "32 bytes" in text
    assert len(doc["errors"]) == 2


def test_unsafe_key_files_are_errors(tmp_path: Path) -> None:
    for mode, size, why in ((0o644, 64, "mode 0644"), (0o600, 16, "16 bytes")):
        sub = tmp_path / f"{mode:o}-{size}"
        sub.mkdir()
        key = key_file(sub, mode=mode, size=size)
        cfg = write(sub, f'[tap]\nhost_tap = "t0"\n[replication]\nkey_file = "{key}"\n')
        res = runner.invoke(app, ["-c", str(cfg), "--json"])
        assert res.exit_code != 0
        assert why in " ".join(json.loads(res.stdout)["errors"])


def test_an_accepted_unprotected_nic_is_a_warning(tmp_path: Path) -> None:
    cfg = good_config(
        tmp_path,
        'netdev = "tap,ifname=tap9,script=no,downscript=no"\nunprotected_output = true',
    )
    # host_tap would tap it: take it out to leave the NIC QEMU's own.
    cfg.write_text(cfg.read_text().replace('host_tap = "tap0"', ""))
    res = runner.invoke(app, ["-c", str(cfg), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["ok"] is True and doc["errors"] == []
    assert any("tap9" in w for w in doc["warnings"])
    human = runner.invoke(app, ["-c", str(cfg)])
    assert human.exit_code == 0 and "warning" in human.output and "ok" in human.output


def test_a_bad_config_file_is_reported_not_raised(tmp_path: Path) -> None:
    cfg = write(tmp_path, "[vm]\nnmae = 1\n")
    res = runner.invoke(app, ["-c", str(cfg), "--json"])
    assert res.exit_code != 0
    assert "vm.nmae" in json.loads(res.stdout)["errors"][0]
    res = runner.invoke(app, ["--json"])
    assert res.exit_code != 0 and "nothing to check" in res.stdout


def test_a_vm_definition_is_checked_with_its_files(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    disk = tmp_path / "root.img"
    disk.write_bytes(b"\0" * (1 << 20))
    key = key_file(tmp_path)
    text = f"""
name = "web1"
machine = "pc-i440fx-7.2"
accel = "tcg"
[boot]
kernel = "{kernel}"
cmdline = "console=ttyS0"
[[disk]]
path = "{disk}"
size_mib = 1
{{disk_extra}}
[[nic]]
mac = "52:54:00:12:34:56"
tap = "ktap0"
[replication]
key_file = "{key}"
[hosts.a]
address = "10.0.0.1"
[hosts.b]
address = "10.0.0.2"
"""
    good = write(tmp_path, text.format(disk_extra=""), "vm.toml")
    res = runner.invoke(app, ["--vm", str(good), "--host", "a", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["vm"] == str(good)
    opted = write(tmp_path, text.format(disk_extra="unprotected_output = true"), "vm2.toml")
    res = runner.invoke(app, ["--vm", str(opted), "--json"])
    doc = json.loads(res.stdout)
    assert res.exit_code == 0 and doc["ok"], res.output
    assert any("disk" in w and "unprotected" in w for w in doc["warnings"])
    missing = write(tmp_path, text.format(disk_extra="").replace(str(kernel), "/nope"), "v3.toml")
    res = runner.invoke(app, ["--vm", str(missing), "--json"])
    assert res.exit_code != 0 and "boot.kernel" in " ".join(json.loads(res.stdout)["errors"])
