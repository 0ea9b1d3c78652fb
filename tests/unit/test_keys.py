"""Replication keys: at least 32 bytes, read from a key file only its owner can read,
and ``kemari key generate`` writes a new one (mode 0600, atomically, no overwrite)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kemari_suite.cli.key import app as key_app
from kemari_suite.config import KemariConfig, ReplicationConfig
from kemari_suite.errors import ConfigError
from kemari_suite.protocol.keys import (
    MIN_KEY_BYTES,
    load_replication_key,
    read_key_file,
    write_key_file,
)

GOOD = "k" * MIN_KEY_BYTES


def _cfg(**kw: str) -> KemariConfig:
    return KemariConfig(replication=ReplicationConfig(**kw))  # type: ignore[arg-type]


def _key_file(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    p = tmp_path / "repl.key"
    p.write_text(text)
    os.chmod(p, mode)
    return p


def test_key_file_is_read_and_stripped(tmp_path: Path) -> None:
    p = _key_file(tmp_path, f"  {GOOD}\n")
    assert load_replication_key(_cfg(key_file=str(p))) == GOOD.encode()


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o620, 0o602])
def test_key_file_reachable_by_group_or_others_is_refused(tmp_path: Path, mode: int) -> None:
    p = _key_file(tmp_path, GOOD, mode)
    with pytest.raises(ConfigError) as ei:
        load_replication_key(_cfg(key_file=str(p)))
    msg = str(ei.value)
    assert str(p) in msg and f"{mode:04o}" in msg and "replication.key_file" in msg


def test_short_key_in_file_is_refused_naming_the_file(tmp_path: Path) -> None:
    p = _key_file(tmp_path, "k" * (MIN_KEY_BYTES - 1))
    with pytest.raises(ConfigError, match=r"31 bytes; keys must be at least 32") as ei:
        load_replication_key(_cfg(key_file=str(p)))
    assert str(p) in str(ei.value) and ei.value.key == "replication.key_file"


def test_missing_or_empty_key_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read key file .*nope"):
        load_replication_key(_cfg(key_file=str(tmp_path / "nope")))
    p = _key_file(tmp_path, "\n")
    with pytest.raises(ConfigError, match="is empty"):
        load_replication_key(_cfg(key_file=str(p)))
    with pytest.raises(ConfigError, match="not a regular file"):
        read_key_file(tmp_path, what="x")


def test_inline_key_accepted_when_long_enough() -> None:
    assert load_replication_key(_cfg(key=GOOD)) == GOOD.encode()


@pytest.mark.parametrize("short", ["k", "secret", "x" * 31])
def test_short_inline_key_is_refused(short: str) -> None:
    with pytest.raises(ConfigError, match="at least 32 bytes") as ei:
        load_replication_key(_cfg(key=short))
    assert ei.value.key == "replication.key"


def test_no_key_and_both_keys_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no replication key"):
        load_replication_key(_cfg())
    p = _key_file(tmp_path, GOOD)
    with pytest.raises(ConfigError, match="not both"):
        load_replication_key(_cfg(key=GOOD, key_file=str(p)))


def test_write_key_file_is_0600_long_and_loadable(tmp_path: Path) -> None:
    old = os.umask(0o022)  # a umask that would give 0644
    try:
        p = write_key_file(tmp_path / "pair.key")
    finally:
        os.umask(old)
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    key = load_replication_key(_cfg(key_file=str(p)))
    assert len(key) >= MIN_KEY_BYTES and len(bytes.fromhex(key.decode())) == 32
    # No temporary file left behind.
    assert sorted(x.name for x in tmp_path.iterdir()) == ["pair.key"]


def test_write_key_file_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    p = write_key_file(tmp_path / "pair.key")
    first = p.read_text()
    with pytest.raises(FileExistsError):
        write_key_file(p)
    assert p.read_text() == first
    os.chmod(p, 0o644)
    write_key_file(p, force=True)
    assert p.read_text() != first and stat.S_IMODE(p.stat().st_mode) == 0o600


def test_two_generated_keys_differ(tmp_path: Path) -> None:
    a = write_key_file(tmp_path / "a.key").read_text()
    b = write_key_file(tmp_path / "b.key").read_text()
    assert a != b


# ---- kemari key generate ---------------------------------------------------------------

runner = CliRunner()


def test_cli_generate_writes_a_key_file(tmp_path: Path) -> None:
    p = tmp_path / "k.key"
    res = runner.invoke(key_app, ["generate", "-o", str(p)])
    assert res.exit_code == 0, res.output
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert len(load_replication_key(_cfg(key_file=str(p)))) == 64


def test_cli_generate_refuses_overwrite_without_force(tmp_path: Path) -> None:
    p = tmp_path / "k.key"
    assert runner.invoke(key_app, ["generate", "-o", str(p)]).exit_code == 0
    first = p.read_text()
    res = runner.invoke(key_app, ["generate", "-o", str(p)])
    assert res.exit_code == 2 and "--force" in res.output
    assert p.read_text() == first
    res = runner.invoke(key_app, ["generate", "-o", str(p), "--force"])
    assert res.exit_code == 0 and p.read_text() != first


def test_cli_generate_to_stdout() -> None:
    res = runner.invoke(key_app, ["generate"])
    assert res.exit_code == 0
    assert len(bytes.fromhex(res.stdout.strip())) == 32
