from __future__ import annotations

from pathlib import Path

import pytest

from kemari_suite.config import KemariConfig, load, with_overrides
from kemari_suite.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "k.toml"
    p.write_text(text)
    return p


def test_defaults_without_a_file() -> None:
    cfg = load(None)
    assert isinstance(cfg, KemariConfig)
    assert cfg.vm.memory_mib == 128
    assert cfg.replication.mode == "speculative"
    assert cfg.replication.tracker == "compare"


def test_values_are_read_and_typed(tmp_path: Path) -> None:
    cfg = load(
        write(
            tmp_path,
            '[vm]\nname = "web1"\nmemory_mib = 256\n[replication]\nmax_interval_ms = 50\n'
            '[paths]\nrun_dir = "/tmp/x"\n[image]\nadd = ["/a:/b"]\n',
        )
    )
    assert cfg.vm.name == "web1" and cfg.vm.memory_mib == 256
    assert cfg.replication.max_interval_ms == 50
    assert cfg.paths.run_dir == Path("/tmp/x")
    assert cfg.image.add == ("/a:/b",)


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ("[vm]\nmemroy_mib = 1\n", "vm.memroy_mib", "unknown key"),
        ('[vm]\nmemory_mib = "lots"\n', "vm.memory_mib", "expected an integer"),
        ("[vm]\nmemory_mib = 8\n", "vm.memory_mib", "at least 16"),
        ('[replication]\nmode = "fast"\n', "replication.mode", "'speculative'"),
        ('[lab]\nlab_id = "toolong"\n', "lab.lab_id", "1-4"),
        ('[replication]\ntiebreaker = "witness"\n', "replication.witness", "witness address"),
        (
            "[replication]\nheartbeat_timeout_ms = 100\nheartbeat_interval_ms = 200\n",
            "replication.heartbeat_timeout_ms",
            "larger",
        ),
        ('[vm]\nname = "a b"\n', "vm.name", "letters"),
        ("[nosuch]\nx = 1\n", "nosuch", "unknown key"),
        ("[vm]\npipelining = true\n", "vm.pipelining", "unknown key"),
    ],
)
def test_bad_values_name_file_and_key(tmp_path: Path, text: str, key: str, words: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load(path)
    assert exc.value.key == key
    assert str(path) in str(exc.value)
    assert words in str(exc.value)


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(write(tmp_path, "[vm\n"))
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "absent.toml")


def test_overrides_are_checked() -> None:
    cfg = with_overrides(load(None), vm={"memory_mib": 64})
    assert cfg.vm.memory_mib == 64
    with pytest.raises(ConfigError):
        with_overrides(cfg, vm={"memory_mib": 1})
