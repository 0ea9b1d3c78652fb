"""Every example config in the docs passes `kemari check` (its text: no files are read).

A ```toml block of README.md or docs/*.md is a whole config when it has ``[vm]`` or
``[replication]`` (an agent config) or ``name`` and ``machine`` (a VM definition);
blocks of one other section (``[alerts]``, ``[[device]]``) are fragments, and are
still required to be valid TOML. Every examples/**/*.toml is a whole config.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from kemari_suite.tap.preflight import preflight

REPO = Path(__file__).resolve().parents[2]
FENCE = re.compile(r"^```toml\n(.*?)^```", re.S | re.M)


def doc_blocks() -> list[tuple[str, str]]:
    out = []
    for md in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = md.read_text()
        for m in FENCE.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            out.append((f"{md.relative_to(REPO)}:{line}", m.group(1)))
    for toml in sorted((REPO / "examples").rglob("*.toml")):
        out.append((str(toml.relative_to(REPO)), toml.read_text()))
    return out


def kind_of(data: dict[str, Any]) -> str:
    if "name" in data and "machine" in data:
        return "vm"
    if "vm" in data or "replication" in data:
        return "config"
    return "fragment"


BLOCKS = doc_blocks()


def test_the_readme_and_the_examples_are_collected() -> None:
    names = [name for name, _ in BLOCKS]
    assert any(n.startswith("README.md:") for n in names)
    assert any(n.startswith("docs/vm-definition.md:") for n in names)
    assert sum(n.startswith("examples/") for n in names) >= 3
    whole = [n for n, text in BLOCKS if kind_of(tomllib.loads(text)) != "fragment"]
    assert any(n.startswith("README.md:") for n in whole)


@pytest.mark.parametrize(("where", "text"), BLOCKS, ids=[name for name, _ in BLOCKS])
def test_example_passes_kemari_check(where: str, text: str, tmp_path: Path) -> None:
    data = tomllib.loads(text)
    kind = kind_of(data)
    if kind == "fragment":
        return
    path = tmp_path / "example.toml"
    path.write_text(text)
    report = (
        preflight(path, check_files=False, machines=None)
        if kind == "config"
        else preflight(None, path, check_files=False, machines=None)
    )
    assert report.ok, f"{where}: " + "; ".join(report.errors)
