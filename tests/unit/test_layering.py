"""The package's shape, read from the source with :mod:`ast` (nothing is imported).

- no import cycle between modules of kemari_suite (imports inside functions count;
  ``if TYPE_CHECKING:`` imports do not);
- no import from a lower layer to a higher one, nor between siblings of one layer
  (:data:`LAYERS`, the same list as ``[tool.importlinter]`` in pyproject.toml);
- no module in the engine folders over :data:`MAX_ENGINE_MODULE_LINES` lines;
- no class anywhere over :data:`MAX_CLASS_LINES` lines.

Every failure lists all its offenders, one per line.
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = "kemari_suite"
ROOT = REPO / PACKAGE

#: High to low; names on one line are siblings, independent of each other. A module may
#: import from its own component and from any lower line.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("cli",),
    ("demo", "bench"),
    ("remote",),
    ("deploy",),
    ("lab", "klab"),
    ("node",),
    ("checkpoint", "replica"),
    ("tap",),
    ("disk",),
    ("ha",),
    ("service", "vm"),
    ("protocol",),
    ("testing",),
    ("alerts",),
    ("config",),
    ("errors",),
)

#: Folders (and modules) of the replication engine, held to the module size limit.
ENGINE = ("protocol", "vm", "tap", "checkpoint", "replica", "ha", "disk", "service", "testing")
ENGINE_MODULES = ("node",)
MAX_ENGINE_MODULE_LINES = 600
MAX_CLASS_LINES = 400


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int

    def __str__(self) -> str:
        return f"{self.importer} -> {self.imported} (line {self.line})"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def _sources() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


@cache
def _tree(module: str) -> ast.Module:
    path = _sources()[module]
    return ast.parse(path.read_text(), filename=str(path))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement below ``node``, skipping ``if TYPE_CHECKING:`` bodies."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.orelse:
                yield from _import_nodes(ast.Module(body=[stmt], type_ignores=[]))
            continue
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child
        yield from _import_nodes(child)


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    package = module if _sources()[module].name == "__init__.py" else module.rpartition(".")[0]
    base = package.split(".")
    if node.level > 1:
        base = base[: -(node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _internal(name: str) -> str | None:
    """The module of kemari_suite that ``name`` names, or its nearest package."""
    while name:
        if name in _sources():
            return name
        name = name.rpartition(".")[0]
    return None


@cache
def imports() -> tuple[Import, ...]:
    found: set[Import] = set()
    for module in _sources():
        for node in _import_nodes(_tree(module)):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = _resolve(module, node)
                # "from pkg import mod" imports the module pkg.mod when there is one.
                targets = [f"{base}.{alias.name}" for alias in node.names] or [base]
                targets = [t if t in _sources() else base for t in targets]
            for target in targets:
                if not (target == PACKAGE or target.startswith(PACKAGE + ".")):
                    continue
                resolved = _internal(target)
                if resolved is not None and resolved != module:
                    found.add(Import(module, resolved, node.lineno))
    return tuple(sorted(found, key=lambda i: (i.importer, i.imported, i.line)))


def _component(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _layer_of() -> dict[str, int]:
    return {name: i for i, line in enumerate(LAYERS) for name in line}


# ---- cycles ----------------------------------------------------------------------------


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    comp.append(top)
                    if top == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def _a_cycle(graph: dict[str, set[str]], members: list[str]) -> list[str]:
    """One concrete cycle through the first member, inside the component."""
    inside = set(members)
    start = members[0]
    parent: dict[str, str] = {}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for child in sorted(graph.get(node, ())):
            if child not in inside:
                continue
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, start]
            if child not in parent:
                parent[child] = node
                queue.append(child)
    return members


def test_no_import_cycles() -> None:
    graph: dict[str, set[str]] = {m: set() for m in _sources()}
    for imp in imports():
        graph[imp.importer].add(imp.imported)
    components = _strongly_connected(graph)
    report = []
    for comp in components:
        report.append(
            f"  cycle among {len(comp)} modules: {' -> '.join(_a_cycle(graph, comp))}"
            f"\n    (all: {', '.join(comp)})"
        )
    assert not components, "import cycles:\n" + "\n".join(report)


# ---- layers ----------------------------------------------------------------------------


def test_every_component_has_a_layer() -> None:
    layer = _layer_of()
    missing = sorted({c for m in _sources() if (c := _component(m)) is not None and c not in layer})
    assert not missing, f"components in no layer (add them to LAYERS and pyproject): {missing}"


def test_layers_match_the_import_linter_contract() -> None:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    contracts = data["tool"]["importlinter"]["contracts"]
    layered = [c for c in contracts if c.get("type") == "layers"]
    assert len(layered) == 1, "one layers contract in [tool.importlinter]"
    declared = [tuple(n.strip() for n in line.split("|")) for line in layered[0]["layers"]]
    assert declared == [tuple(line) for line in LAYERS]


def test_no_import_goes_up_or_across_the_layers() -> None:
    layer = _layer_of()
    bad = []
    for imp in imports():
        src, dst = _component(imp.importer), _component(imp.imported)
        if src is None or dst is None or src == dst:
            continue
        if src not in layer or dst not in layer:
            continue  # reported by test_every_component_has_a_layer
        if layer[dst] < layer[src]:
            bad.append(f"  up:     {imp}  [{src} is below {dst}]")
        elif layer[dst] == layer[src]:
            bad.append(f"  across: {imp}  [{src} and {dst} are independent siblings]")
    assert not bad, f"{len(bad)} imports break the layers:\n" + "\n".join(bad)


# ---- sizes -----------------------------------------------------------------------------


def test_engine_modules_are_small() -> None:
    big = []
    for module, path in _sources().items():
        comp = _component(module)
        if comp in ENGINE or comp in ENGINE_MODULES:
            n = len(path.read_text().splitlines())
            if n > MAX_ENGINE_MODULE_LINES:
                big.append(f"  {path.relative_to(REPO)}: {n} lines")
    title = f"engine modules over {MAX_ENGINE_MODULE_LINES} lines:"
    assert not big, "\n".join([title, *sorted(big)])


def test_classes_are_small() -> None:
    big = []
    for module, path in _sources().items():
        for node in ast.walk(_tree(module)):
            if isinstance(node, ast.ClassDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_CLASS_LINES:
                    big.append(f"  {path.relative_to(REPO)}:{node.lineno} {node.name}: {n} lines")
    assert not big, f"classes over {MAX_CLASS_LINES} lines:\n" + "\n".join(sorted(big))


#: Where the data path runs: it calls the disk interface and never names a backend or
#: asks a tracker's type (vm/ may name backends only in the VM definition's schema).
DATA_PATH = ("checkpoint", "replica", "tap", "service", "protocol", "ha", "testing")
BACKEND_NAMES = ("builtin", "drbd", "shared")


def test_the_data_path_names_no_backend_and_no_tracker_type() -> None:
    found: list[str] = []
    files = [p for c in DATA_PATH for p in sorted((ROOT / c).rglob("*.py"))]
    files.append(ROOT / "node.py")
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            where = f"  {path.relative_to(REPO)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Compare):
                names = [
                    c.value
                    for c in [node.left, *node.comparators]
                    if isinstance(c, ast.Constant) and isinstance(c.value, str)
                ]
                hit = [n for n in names if n in BACKEND_NAMES]
                if hit:
                    found.append(f"{where} compares with backend name {hit[0]!r}")
            if (
                isinstance(node, ast.Attribute)
                and node.attr == "backend"
                and isinstance(node.value, ast.Attribute)
                and node.value.attr == "disk"
            ):
                found.append(f"{where} reads the disk.backend setting")
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "isinstance"
                and any(isinstance(a, ast.Name) and a.id.endswith("Tracker") for a in node.args[1:])
            ):
                found.append(f"{where} tests a tracker's type")
    assert not found, "the data path must use capabilities:\n" + "\n".join(found)
