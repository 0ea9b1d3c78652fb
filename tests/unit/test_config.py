from __future__ import annotations

import dataclasses
import math
import tempfile
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kemari_suite.config import (
    KemariConfig,
    dump_toml,
    load,
    read_toml,
    toml_key,
    toml_value,
    with_overrides,
)
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
    assert cfg.replication.tracker == "auto"


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
        ('[replication]\npipelining = "yes"\n', "replication.pipelining", "'auto'"),
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


# ---- TOML writing: what dump_toml writes, read_toml reads back ---------------------------


def read_back(text: str) -> dict[str, Any]:
    """``text`` written to a file and read with :func:`read_toml`, as an agent reads it."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "t.toml"
        path.write_text(text, encoding="utf-8")
        return read_toml(path)


def as_toml_reads_it(value: Any) -> Any:
    """The value TOML gives back for ``value``: paths as strings, sequences as lists."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {k: as_toml_reads_it(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [as_toml_reads_it(v) for v in value]
    return value


keys = st.text(max_size=12)
scalars = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=24),
    st.builds(Path, st.text(max_size=24)),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, inner),
        st.dictionaries(keys, inner, max_size=4),
        st.lists(st.dictionaries(keys, inner, max_size=3), min_size=1, max_size=3),
    ),
    max_leaves=24,
)
trees = st.dictionaries(keys, values, max_size=6)


@settings(max_examples=200, deadline=None)
@given(tree=trees, header=st.text(max_size=80))
def test_dump_toml_round_trips_any_tree(tree: dict[str, Any], header: str) -> None:
    text = dump_toml(tree, header=header)
    assert read_back(text) == as_toml_reads_it(tree)
    n = len(header.splitlines())
    assert all(line.startswith("#") for line in text.splitlines()[:n])


def strategy_for(tp: Any) -> st.SearchStrategy[Any]:
    """Values of a config annotation, as the dataclass tree holds them."""
    if get_origin(tp) is Literal:
        return st.sampled_from(get_args(tp))
    if get_origin(tp) in (typing.Union, types.UnionType):
        return st.one_of(*(strategy_for(arm) for arm in get_args(tp)))
    if get_origin(tp) is tuple:
        return st.lists(strategy_for(get_args(tp)[0]), max_size=3).map(tuple)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        hints = typing.get_type_hints(tp)
        fields = {f.name: strategy_for(hints[f.name]) for f in dataclasses.fields(tp)}
        return st.fixed_dictionaries(fields).map(lambda kw: tp(**kw))
    simple: dict[Any, st.SearchStrategy[Any]] = {
        bool: st.booleans(),
        int: st.integers(0, 2**31),
        float: st.floats(allow_nan=False, allow_infinity=False),
        str: st.text(max_size=24),
        Path: st.builds(Path, st.text(min_size=1, max_size=24)),
    }
    return simple[tp]


@settings(max_examples=100, deadline=None)
@given(cfg=strategy_for(KemariConfig))
def test_dump_toml_round_trips_the_config_tree(cfg: KemariConfig) -> None:
    tree = dataclasses.asdict(cfg)
    assert read_back(dump_toml(tree)) == as_toml_reads_it(tree)


def test_a_dumped_config_loads_as_the_same_config(tmp_path: Path) -> None:
    cfg = with_overrides(
        load(None),
        vm={"name": "web-1", "append": 'quote" back\\ tab\t', "memory_mib": 512},
        image={"add": ("/a:/b", "/é:/ü")},
        replication={"key": "k\n\x01", "tiebreaker": "witness", "witness": "10.0.0.3:7411"},
    )
    path = write(tmp_path, dump_toml(dataclasses.asdict(cfg), header="generated"))
    assert load(path) == cfg


#: A deploy-rendered config: one table per section, scalars and lists of scalars in it.
sections = st.dictionaries(
    keys,
    st.dictionaries(
        keys,
        st.one_of(scalars, st.lists(scalars, max_size=4), st.tuples(scalars, scalars)),
        max_size=5,
    ),
    max_size=4,
)


@settings(max_examples=200, deadline=None)
@given(tree=sections)
def test_toml_key_and_value_round_trip_a_sectioned_file(tree: dict[str, dict[str, Any]]) -> None:
    lines = []
    for section, table in tree.items():
        lines.append(f"[{toml_key(section)}]")
        lines += [
            f"{toml_key(k)} = {toml_value(v, key=f'{section}.{k}')}" for k, v in table.items()
        ]
    assert read_back("\n".join(lines) + "\n") == as_toml_reads_it(tree)


@pytest.mark.parametrize(
    ("tree", "key"),
    [
        ({"vm": {"name": None}}, "vm.name"),
        ({"vm": {"ratio": math.inf}}, "vm.ratio"),
        ({"vm": {"ratio": math.nan}}, "vm.ratio"),
        ({"disk": [{"path": "/x"}, {"path": object()}]}, "disk[1].path"),
        ({"hosts": {"a": {"nic": {0: {"tap": "t"}}}}}, "hosts.a.nic"),
    ],
)
def test_dump_toml_names_the_key_it_cannot_write(tree: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        dump_toml(tree)
    assert info.value.key == key


@pytest.mark.parametrize("bad", [None, {"a": 1}, [{"a": 1}], math.inf, object()])
def test_toml_value_refuses_tables_and_values_without_a_form(bad: object) -> None:
    with pytest.raises(ConfigError) as info:
        toml_value(bad, key="vm.name")
    assert info.value.key == "vm.name"


def test_dump_toml_keeps_the_header_as_comments_even_with_control_characters() -> None:
    text = dump_toml({"a": 1}, header="line one\n\nbell\x07 del\x7f")
    assert text.startswith("# line one\n#\n# bell\\x07 del\\x7f\n\n")
    assert tomllib.loads(text) == {"a": 1}
    assert dump_toml({}) == ""
