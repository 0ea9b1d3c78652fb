"""The lab's configs name key files (never inline keys): a replication key file both
hosts read and the pair's own key at the witness, each mode 0600 and at least 32 bytes,
and the witness never gets the replication key."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from kemari_suite.config import KemariConfig, PathsConfig, load
from kemari_suite.errors import ConfigError
from kemari_suite.lab import configs as labconfigs
from kemari_suite.lab import layout
from kemari_suite.lab.configs import PairOptions
from kemari_suite.lab.pair import LabPair
from kemari_suite.protocol.keys import MIN_KEY_BYTES, load_replication_key, read_key_file

LAB = "q8"


@pytest.fixture
def base(tmp_path: Path) -> KemariConfig:
    paths = PathsConfig(
        cache_dir=tmp_path / "cache", run_dir=tmp_path / "run", shm_dir=tmp_path / "shm"
    )
    return KemariConfig(paths=paths)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_configs_name_owner_only_key_files(base: KemariConfig, tmp_path: Path) -> None:
    written = labconfigs.write(layout(LAB), base, PairOptions(), tmp_path / "cfg")
    pri = load(written.configs["primary"])
    key = load_replication_key(pri)
    assert len(key) >= MIN_KEY_BYTES
    assert load_replication_key(load(written.configs["secondary"])) == key
    wkey = read_key_file(pri.replication.witness_key_file, what="x")
    assert len(wkey) >= MIN_KEY_BYTES and wkey != key
    for p in tmp_path.joinpath("cfg").rglob("*"):
        assert _mode(p) == (0o700 if p.is_dir() else 0o600), p
    # The witness reads <keys_dir>/<pair>.key and has no replication key at all.
    wit = load(written.configs["witness"])
    assert (wit.witness.keys_dir / "guest.key").read_bytes().strip() == wkey
    text = written.configs["witness"].read_text()
    assert key.decode() not in text and "key_file" not in text
    assert wit.witness.state_file.parent == labconfigs.role_run_dir(base.paths, LAB, "witness")


def test_no_inline_key_in_any_config(base: KemariConfig, tmp_path: Path) -> None:
    written = labconfigs.write(layout(LAB), base, PairOptions(), tmp_path / "cfg", key="z" * 64)
    for path in written.configs.values():
        assert "z" * 64 not in path.read_text(), path
    assert written.key_file.read_text().strip() == "z" * 64


def test_a_short_lab_key_is_refused(base: KemariConfig, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at least 32 bytes"):
        labconfigs.write(layout(LAB), base, PairOptions(), tmp_path / "cfg", key="secret")


def test_labpair_vm_definition_uses_the_key_files(base: KemariConfig, tmp_path: Path) -> None:
    pair = LabPair(layout(LAB), base, PairOptions())
    path = pair.write_vm_definition(
        kernel=tmp_path / "k",
        initrd=tmp_path / "i",
        cmdline="console=ttyS0",
        disk_a=tmp_path / "a.img",
        disk_b=tmp_path / "b.img",
    )
    text = path.read_text()
    assert pair.key not in text
    assert f'key_file = "{pair.key_file}"' in text
    assert f'witness_key_file = "{pair.witness_key_file}"' in text
    assert _mode(path) == 0o600 and _mode(pair.root) == 0o700


def test_tls_option_reaches_both_hosts(base: KemariConfig, tmp_path: Path) -> None:
    for tls in ("on", "off"):
        written = labconfigs.write(layout(LAB), base, PairOptions(tls=tls), tmp_path / tls)
        for role in ("primary", "secondary"):
            assert load(written.configs[role]).replication.tls == tls
    assert labconfigs.options_from_config(base).tls == base.replication.tls
