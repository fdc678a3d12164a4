"""Imports between hiad_pl's modules point one way: no module imports itself through others.

The graph is read from the source (``ast``), without importing anything:

- imports at module level and imports inside functions both count. A function-local
  import only defers a dependency to the first call; a circle closed by one is still a
  circle of the design (and the usual way such circles were hidden), so it fails too.
- imports under ``if TYPE_CHECKING:`` do not count: they never run, so they cannot
  take part in an import-order failure, and annotating a parameter with a class of a
  higher layer is how a callback documents what it is handed.
- ``import a.b.c`` depends on ``a.b.c`` only, not on the packages above it: Python runs
  a package's ``__init__`` first, but the package initialisers here import their
  submodules (``hiad_pl.detectors`` its detectors), which would make every package a
  circle of its own without saying anything about the layers.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

PACKAGE = "hiad_pl"
SOURCE = Path(__file__).resolve().parents[1] / "src"

#: Circles that exist and are to be broken; each entry is the sorted list of a circle's modules.
#: Empty: a new circle fails the test. Only add an entry with a comment that says why it
#: cannot be broken yet.
KNOWN_CIRCLES: list[list[str]] = []


def module_files(source: Path = SOURCE) -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    modules = {}
    for path in sorted((source / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(source).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_modules(tree: ast.Module, module: str, is_package: bool, known: Iterable[str]) -> set[str]:
    """The package's modules that ``module`` imports (see the module docstring for what counts)."""
    known = set(known)

    def targets(node: ast.Import | ast.ImportFrom) -> list[str]:
        if isinstance(node, ast.Import):
            return [alias.name for alias in node.names]
        base = node.module or ""
        if node.level:  # relative: from the module's package, one level up per extra dot
            anchor = module.split(".") if is_package else module.split(".")[:-1]
            anchor = anchor[: len(anchor) - node.level + 1]
            base = ".".join([*anchor, base] if base else anchor)
        # `from hiad_pl import commands` imports the module hiad_pl.commands
        return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]

    found: set[str] = set()

    def visit(statements: Iterable[ast.AST]) -> None:
        for node in statements:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for name in targets(node):
                    while name and name not in known:  # `import a.b.Name` -> the module a.b
                        name = name.rpartition(".")[0]
                    if name and name != module:
                        found.add(name)
            elif isinstance(node, ast.If) and _is_type_checking(node.test):
                visit(node.orelse)
            else:
                visit(ast.iter_child_nodes(node))

    visit(tree.body)
    return found


def import_graph(source: Path = SOURCE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports."""
    files = module_files(source)
    return {
        name: imported_modules(ast.parse(path.read_text(encoding="utf-8")), name, path.name == "__init__.py", files)
        for name, path in files.items()
    }


def circles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (or a module importing itself), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(start: str) -> None:
        # iterative Tarjan: the import graph is small, but recursion depth should not depend on it
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph.get(node, ()):
                    found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return sorted(found)


def one_cycle(graph: Mapping[str, Iterable[str]], members: list[str]) -> list[str]:
    """A path ``a -> b -> ... -> a`` through the circle ``members``, to name it in a failure."""
    inside = set(members)
    path = [members[0]]
    seen = {members[0]}
    while True:
        step = sorted(n for n in graph[path[-1]] if n in inside)
        back = [n for n in step if n == path[0]]
        if back and len(path) > 1:
            return [*path, path[0]]
        fresh = [n for n in step if n not in seen]
        if not fresh:
            return [*path, step[0]]
        path.append(fresh[0])
        seen.add(fresh[0])


def test_no_import_circle_among_the_packages_modules() -> None:
    graph = import_graph()
    assert len(graph) > 50 and "hiad_pl.cli" in graph  # the whole package was read
    new = [c for c in circles(graph) if c not in KNOWN_CIRCLES]
    assert not new, "import circles: " + "; ".join(" -> ".join(one_cycle(graph, c)) for c in new)


def test_known_circles_are_still_circles() -> None:
    """A broken circle leaves the list, so that it cannot come back unnoticed."""
    present = circles(import_graph())
    assert [c for c in KNOWN_CIRCLES if c not in present] == []


def test_the_reader_counts_function_local_and_relative_imports_but_not_type_checking(tmp_path: Path) -> None:
    package = tmp_path / PACKAGE
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from . import leaf\n")
    (package / "sub" / "leaf.py").write_text("def f():\n    from hiad_pl import top\n")
    (package / "top.py").write_text(
        "from typing import TYPE_CHECKING\nfrom .sub.leaf import f\nif TYPE_CHECKING:\n    from hiad_pl import other\n"
    )
    (package / "other.py").write_text("import hiad_pl.top\n")
    graph = import_graph(tmp_path)
    assert graph["hiad_pl.top"] == {"hiad_pl.sub.leaf"}
    assert graph["hiad_pl.sub.leaf"] == {"hiad_pl.top"}
    assert graph["hiad_pl.sub"] == {"hiad_pl.sub.leaf"}
    assert graph["hiad_pl.other"] == {"hiad_pl.top"}
    assert circles(graph) == [["hiad_pl.sub.leaf", "hiad_pl.top"]]
    assert one_cycle(graph, ["hiad_pl.sub.leaf", "hiad_pl.top"]) == ["hiad_pl.sub.leaf", "hiad_pl.top", "hiad_pl.sub.leaf"]


def test_the_circles_that_were_broken_stay_broken() -> None:
    """config no longer reaches the launchers (RayOptions moved), the launchers not the orchestrator."""
    graph = import_graph()
    assert "hiad_pl.launchers" not in graph["hiad_pl.config"]
    assert "hiad_pl.orchestrator" not in graph["hiad_pl.launchers"]
