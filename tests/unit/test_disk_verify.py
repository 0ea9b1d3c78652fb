from __future__ import annotations

from pathlib import Path

import pytest

from kemari_suite.disk.verify import BLOCK, Checksums, checksums, compare, load_or_compute
from kemari_suite.errors import DiskError


def _img(path: Path, blocks: int, patch: dict[int, bytes] | None = None) -> Path:
    data = bytearray(blocks * BLOCK)
    for b, v in (patch or {}).items():
        data[b * BLOCK : b * BLOCK + len(v)] = v
    path.write_bytes(bytes(data))
    return path


def test_same_copies_verify(tmp_path: Path) -> None:
    a = _img(tmp_path / "a.img", 8, {3: b"x"})
    b = _img(tmp_path / "b.img", 8, {3: b"x"})
    res = compare(checksums(a), checksums(b))
    assert res.same and res.blocks == 8


def test_diverged_blocks_are_named(tmp_path: Path) -> None:
    a = _img(tmp_path / "a.img", 8, {1: b"x", 6: b"y"})
    b = _img(tmp_path / "b.img", 8, {1: b"x", 6: b"z", 7: b"w"})
    res = compare(checksums(a), checksums(b))
    assert not res.same and res.differing == [6, 7]


def test_checksum_file_round_trip_and_bad_input(tmp_path: Path) -> None:
    a = _img(tmp_path / "a.img", 4)
    j = tmp_path / "a.json"
    j.write_text(checksums(a).to_json())
    assert compare(load_or_compute(str(j)), checksums(a)).same
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(DiskError, match=r"bad\.json"):
        load_or_compute(str(bad))
    with pytest.raises(DiskError, match="cannot read"):
        checksums(tmp_path / "absent.img")
    with pytest.raises(DiskError, match="block sizes"):
        compare(Checksums("x", 0, 4096, ()), Checksums("y", 0, BLOCK, ()))
