"""The protocol package is a low layer: what it, the witness and the control socket import.

Read from the source with :mod:`ast`, nothing is imported. Stricter than the layers of
``test_layering``: these modules may use nothing of kemari_suite but the few named here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "kemari_suite"

#: module file -> the kemari_suite packages and modules it may import from
ALLOWED = {
    **{
        p.relative_to(ROOT).as_posix(): ("errors", "config", "protocol")
        for p in sorted((ROOT / "protocol").glob("*.py"))
    },
    # The witness and its on-disk state: each other, and the same low layer.
    "ha/witness.py": ("errors", "config", "protocol", "ha.witness_state"),
    "ha/witness_state.py": ("errors", "config", "protocol"),
    "service/control.py": ("errors", "config", "protocol"),
}


def internal_imports(path: Path) -> list[str]:
    """Every kemari_suite module or package ``path`` imports, functions included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            out.append(node.module or "")
    return [name for name in out if name.startswith("kemari_suite")]


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_low_layer_modules_import_only_what_they_may(module: str) -> None:
    allowed = ALLOWED[module]
    bad = [
        name
        for name in internal_imports(ROOT / module)
        if name.partition(".")[2].partition(".")[0] not in allowed
        and name.partition(".")[2] not in allowed
    ]
    assert not bad, f"{module} imports {bad}; it may import only kemari_suite.{allowed}"
