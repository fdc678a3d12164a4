"""Imports between hiad_pl's modules point one way: no circle, and no import from a lower layer to a higher one.

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


# ------------------------------------------------------------------------------------------ layers

#: The package's layers, top to bottom, each a list of module names. A name covers the module and,
#: when it is a package, every module below it, unless a longer name places that one elsewhere
#: (``hiad_pl.utils`` is the tutorial's face, ``hiad_pl.utils.allocator`` the foundation's); the
#: package itself, ``hiad_pl``, covers only its ``__init__``. A module may import its own layer
#: and the layers below it, never one above. Why each module sits where it does:
LAYERS: dict[str, list[str]] = {
    # The original project's tutorial API: names and option spellings translated to ours, no logic
    # of their own. Nothing in the package imports them.
    "compat": [
        "hiad_pl.trainer",  # HRTrainer: a tutorial config -> the engine + outputs
        "hiad_pl.inferencer",  # HRInferencer / client_detection over the serving face
        "hiad_pl.task",  # task generators under the tutorial's import path
        "hiad_pl.syn",  # synthesisers under the tutorial's names
        "hiad_pl.utils",  # hiad_pl.utils.{base, metrics, metrics_gpu, split_and_gather}
    ],
    # Entry points: parse a command, call the engine, write what the user asked for.
    "faces": [
        "hiad_pl.cli",  # the hiad-pl command line
        "hiad_pl.commands",  # fit / test / predict / tasks as functions of a RunConfig
        "hiad_pl.serve",  # the HTTP service over a loaded run
        "hiad_pl.outputs",  # metrics, visualisations and prediction files of a test run
        "hiad_pl.demo",  # the procedural demo data set behind `hiad-pl demo-data`: a tool, not library data
    ],
    # Composes the parts below into fits and loaded runs; knows run folders, devices, processes.
    "engine": [
        "hiad_pl.engine",  # run folder, task trainer, callbacks, routing, launchers, loading
        "hiad_pl.orchestrator",  # TaskOrchestrator under its import path
        "hiad_pl.calibration",  # thresholds chosen after a fit, from a fitted orchestrator
        "hiad_pl.fit_settings",  # the settings a model folder was fitted with (resume or refuse)
        "hiad_pl.checkpoint_io",  # Lightning's checkpoint plugin, writing atomically
        "hiad_pl.interrupts",  # SIGINT / SIGTERM around Lightning fits
        "hiad_pl.deploy.export",  # traces a loaded run's detectors and post-processing into graphs
    ],
    # Whole images: tasks (which patches a detector sees) and the inference pipeline (route, score,
    # stitch). They use detectors through their interface and never fit one.
    "pipeline": [
        "hiad_pl.inference",
        "hiad_pl.tasks",
    ],
    # The methods: LightningModules over patch batches, their shared base and parts, the registry's users.
    "models": [
        "hiad_pl.detectors",
    ],
    # Frozen feature extractors: timm CNN maps, ViT token grids, weights; no method in them.
    "backbones": [
        "hiad_pl.detectors.backbones",
        "hiad_pl.detectors.features",
        "hiad_pl.detectors.token_pyramid",
    ],
    # Know nothing of models: images, patches, synthesis, data modules; maps -> scores; metrics,
    # curves, decisions, files of predictions, pictures; the torch-free exported predictor.
    "data": [
        "hiad_pl.data",
        "hiad_pl.postprocess",
        "hiad_pl.metrics",
        "hiad_pl.decisions",
        "hiad_pl.visualize",
        "hiad_pl.deploy",  # the package, deploy.files and deploy.predictor (export sits in the engine)
    ],
    # Imported by everything: configuration model, detector registry, errors, file writing, helpers
    # without a domain.
    "foundation": [
        "hiad_pl",
        "hiad_pl.config",  # dataclasses and option checks; detector classes come from the registry
        "hiad_pl.registry",  # detectors register into it; the config resolves names through it
        "hiad_pl.errors",
        "hiad_pl.private_apis",
        "hiad_pl.run_folder",  # atomic writes, JSON and checkpoint reading (the folder's rules: engine)
        "hiad_pl.utils.array_store",
        "hiad_pl.utils.allocator",
    ],
}

#: Imports from a lower layer to a higher one that exist and are to be removed, as
#: ``(importer, imported)``. Empty: a new upward import fails the test. Only add an entry with a
#: comment that says why it cannot be removed yet.
KNOWN_UPWARD_IMPORTS: list[tuple[str, str]] = []


def layer_of(module: str, layers: Mapping[str, Iterable[str]] = LAYERS) -> str | None:
    """The layer whose longest name covers ``module`` (``None``: no layer names it)."""
    best: tuple[int, str] | None = None
    for layer, names in layers.items():
        for name in names:
            covers = module == name or (name != PACKAGE and module.startswith(name + "."))
            if covers and (best is None or len(name) > best[0]):
                best = (len(name), layer)
    return None if best is None else best[1]


def upward_imports(
    graph: Mapping[str, Iterable[str]], layers: Mapping[str, Iterable[str]] = LAYERS
) -> list[tuple[str, str]]:
    """``(importer, imported)`` for every import of a module in a higher layer than its importer's."""
    rank = {layer: position for position, layer in enumerate(layers)}  # 0 is the top
    found = []
    for module, imported in sorted(graph.items()):
        own = layer_of(module, layers)
        for target in sorted(imported):
            theirs = layer_of(target, layers)
            if own is not None and theirs is not None and rank[theirs] < rank[own]:
                found.append((module, target))
    return found


def test_every_module_has_a_layer() -> None:
    graph = import_graph()
    assert [m for m in graph if layer_of(m) is None] == []


def test_every_layer_entry_names_a_module() -> None:
    """A name for a module that was moved or removed goes too, so that the map stays the package's."""
    modules = set(import_graph())
    assert [n for names in LAYERS.values() for n in names if n not in modules] == []


def test_no_module_imports_a_higher_layer() -> None:
    graph = import_graph()
    new = [edge for edge in upward_imports(graph) if edge not in KNOWN_UPWARD_IMPORTS]
    assert not new, "upward imports: " + "; ".join(
        f"{a} ({layer_of(a)}) -> {b} ({layer_of(b)})" for a, b in new
    )


def test_known_upward_imports_still_exist() -> None:
    """A removed upward import leaves the list, so that it cannot come back unnoticed."""
    present = upward_imports(import_graph())
    assert [edge for edge in KNOWN_UPWARD_IMPORTS if edge not in present] == []


def test_the_layer_checker_catches_an_upward_import(tmp_path: Path) -> None:
    package = tmp_path / PACKAGE
    (package / "low").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "low" / "__init__.py").write_text("")
    (package / "low" / "base.py").write_text("X = 1\n")
    (package / "low" / "sneaky.py").write_text("def f():\n    from hiad_pl.top import g\n")
    (package / "low" / "typed.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from hiad_pl.top import g\n"
    )
    (package / "top.py").write_text("from hiad_pl.low.base import X\ndef g():\n    return X\n")
    (package / "stray.py").write_text("")
    layers = {"top": ["hiad_pl.top"], "low": ["hiad_pl", "hiad_pl.low"]}
    graph = import_graph(tmp_path)
    assert layer_of("hiad_pl.low.sneaky", layers) == "low" and layer_of("hiad_pl.stray", layers) is None
    # the function-local import counts, the TYPE_CHECKING one and the downward one do not
    assert upward_imports(graph, layers) == [("hiad_pl.low.sneaky", "hiad_pl.top")]
    assert upward_imports(graph, {"top": ["hiad_pl.low"], "low": ["hiad_pl", "hiad_pl.top"]}) == [
        ("hiad_pl.top", "hiad_pl.low.base")
    ]
