"""The controller-side wheel build of the kemari role (playbooks/roles/kemari/files)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "playbooks" / "roles" / "kemari" / "files" / "build_wheel.py"


def _can_build_offline() -> bool:
    if importlib.util.find_spec("wheel") is not None:
        return True
    import setuptools

    major, minor = (int(x) for x in setuptools.__version__.split(".")[:2])
    return (major, minor) >= (70, 1)  # bdist_wheel moved into setuptools


pytestmark = pytest.mark.skipif(
    not _can_build_offline(), reason="needs `wheel` (or setuptools >= 70.1) to build offline"
)


def checkout(path: Path) -> Path:
    (path / "kemari_suite").mkdir(parents=True)
    (path / "kemari_suite" / "__init__.py").write_text('"""tiny"""\n')
    (path / "kemari_suite" / "__pycache__").mkdir()
    (path / "kemari_suite" / "__pycache__" / "x.pyc").write_bytes(b"junk")
    (path / "README.md").write_text("tiny\n")
    (path / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "kemari-suite"\nversion = "0.1.0"\nreadme = "README.md"\n'
        '[tool.setuptools.packages.find]\ninclude = ["kemari_suite*"]\n'
    )
    return path


def build(src: Path, out: Path) -> dict[str, object]:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(src), str(out), "--no-build-isolation"],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_builds_once_per_source_tree_and_labels_the_version(tmp_path: Path) -> None:
    src = checkout(tmp_path / "src")
    out = tmp_path / "out"
    first = build(src, out)
    wheel = Path(str(first["wheel"]))
    assert first["changed"] is True and wheel.parent == out
    assert wheel.name == f"kemari_suite-0.1.0+src.{first['tag']}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    assert "kemari_suite/__init__.py" in names and not any(".pyc" in n for n in names)
    # Nothing written into the checkout (no build/, no egg-info).
    assert sorted(p.name for p in src.iterdir()) == ["README.md", "kemari_suite", "pyproject.toml"]

    again = build(src, out)
    assert again == {**first, "changed": False}
    # A cache file does not count as a change; a source file does.
    (src / "kemari_suite" / "__pycache__" / "y.pyc").write_bytes(b"more junk")
    assert build(src, out)["changed"] is False
    (src / "kemari_suite" / "__init__.py").write_text('"""changed"""\n')
    third = build(src, out)
    assert third["changed"] is True and third["tag"] != first["tag"]
    assert [p.name for p in out.glob("*.whl")] == [Path(str(third["wheel"])).name]


def test_same_sources_give_the_same_bytes(tmp_path: Path) -> None:
    src = checkout(tmp_path / "src")
    a = Path(str(build(src, tmp_path / "a")["wheel"])).read_bytes()
    b = Path(str(build(src, tmp_path / "b")["wheel"])).read_bytes()
    assert a == b


def test_refuses_a_directory_that_is_not_a_checkout(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2 and "not a Kemari Suite checkout" in proc.stderr
