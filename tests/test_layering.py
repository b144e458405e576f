"""The layering of the package (docs/layout.md), checked from the source with `ast`, without importing it.

Every `import` / `from ... import` statement counts, at module level or inside a function. Relative
imports are resolved to full module names (`from ..train import fit` in `ltr/experiments/sweep.py` is an
edge to `ltr.train`). A name imported from a package that is itself a submodule (`from . import data`)
is an edge to that submodule. Importing a submodule also runs its parents' `__init__.py`; those implicit
edges are left out, because `ltr/__init__.py` imports the public names from everywhere and would link
every module to every other one.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "ltr"
TOP_PACKAGE = "ltr"

ENGINE = "ltr.engine"
EXPERIMENTS = "ltr.experiments"
# What the engine must never reach: the loop above it, the run readers, the figures, the experiments.
ABOVE_ENGINE = ("ltr.train", "ltr.plots", "ltr.runs", EXPERIMENTS)
# The top of the stack: the only modules that may import the experiments.
TOP = {
    "ltr.cli": "the command line",
    "ltr.notebook_tools": "the notebooks' helpers",
    # Documented exception: ltr/__init__.py is the public face of the package, not part of the core. It
    # re-exports ltr.run_sweep (experiments.sweep) and ltr.sweep_grid (experiments.tuning), which the
    # notebooks use; a lazy re-export could not be told apart from a real import by a static test.
    "ltr": "the package's public names (ltr/__init__.py)",
}
# `python -m ltr`: it only calls the CLI, so it sits on top with it (it may reach the experiments).
ENTRY = "ltr.__main__"


# ---------------------------------------------------------------- the import graph


def module_name(path: Path, root: Path = ROOT) -> str:
    """ltr/engine/step.py -> ltr.engine.step; ltr/engine/__init__.py -> ltr.engine."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def in_tree(module: str, prefix: str) -> bool:
    """True when module is prefix or one of its submodules (ltr.engine.step is in ltr.engine)."""
    return module == prefix or module.startswith(prefix + ".")


def _known(name: str, known: set[str]) -> str | None:
    """The longest known module that name is or lies in (ltr.data.LtrError -> ltr.data), else None."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in known:
            return candidate
    return None


def imports_of(source: str, module: str, package: bool, known: set[str]) -> set[str]:
    """The known modules that `source` (the text of `module`) imports, anywhere in the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                hit = _known(alias.name, known)
                if hit:
                    found.add(hit)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                # The package the dots count from: the module's own for an __init__, else its parent's.
                base = module.split(".") if package else module.split(".")[:-1]
                if node.level - 1 > len(base) - 1:
                    raise AssertionError(f"{module}: `from {'.' * node.level}{node.module or ''} import` "
                                         "climbs above the top-level package")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [alias.name for alias in node.names]
            if target == TOP_PACKAGE:
                # `from .. import __version__` reads the string that ltr/__init__.py sets before its own
                # imports; it does not depend on what the package imports, so it is not an edge.
                names = [n for n in names if n != "__version__"]
                if not names:
                    continue
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
            found.update(submodules)
            if len(submodules) < len(names):  # some names are attributes of target itself
                hit = _known(target, known)
                if hit:
                    found.add(hit)
    found.discard(module)
    return found


def build_graph(package_dir: Path = PACKAGE, root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the ltr modules it imports, for every .py file under package_dir."""
    paths = sorted(package_dir.rglob("*.py"))
    known = {module_name(p, root) for p in paths}
    graph = {}
    for path in paths:
        name = module_name(path, root)
        graph[name] = imports_of(path.read_text(encoding="utf-8"), name, is_package(path), known)
    return graph


def chain(graph: dict[str, set[str]], start: str, goal: Iterable[str] | str,
          exact: Iterable[str] = ()) -> list[str] | None:
    """The shortest import chain from start to a module in the trees `goal` or among `exact`, or None."""
    goals = (goal,) if isinstance(goal, str) else tuple(goal)
    exact = set(exact)
    prev: dict[str, str | None] = {start: None}
    todo = [start]
    while todo:
        nxt = []
        for mod in todo:
            for dep in sorted(graph.get(mod, ())):
                if dep in prev:
                    continue
                prev[dep] = mod
                if dep in exact or any(in_tree(dep, g) for g in goals):
                    path = [dep]
                    while prev[path[-1]] is not None:
                        path.append(prev[path[-1]])
                    return path[::-1]
                nxt.append(dep)
        todo = nxt
    return None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One import cycle (as a path that ends where it starts) per strongly connected group of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm; the package is small enough for recursion
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    found = []
    for group in groups:
        inside = {m: graph[m] & set(group) for m in group}
        back = chain(inside, group[0], (), exact=(m for m in group if group[0] in graph[m]))
        found.append([*back, group[0]] if back else [group[0], group[0]])
    return found


def _show(path: list[str]) -> str:
    return " -> ".join(path)


GRAPH = build_graph()


# ---------------------------------------------------------------- the graph itself


def test_relative_imports_resolve_to_module_paths() -> None:
    known = {"ltr", "ltr.train", "ltr.data", "ltr.plots", "ltr.engine", "ltr.engine.step",
             "ltr.engine.dist", "ltr.experiments", "ltr.experiments.tables", "ltr.experiments.sweep"}
    source = (
        "import os\n"
        "from ..train import fit\n"
        "from . import tables\n"
        "from ..engine.step import StepRunner\n"
        "def later():\n"
        "    from ..plots import figure\n"
        "    import ltr.engine.dist\n"
    )
    assert imports_of(source, "ltr.experiments.sweep", False, known) == {
        "ltr.train", "ltr.experiments.tables", "ltr.engine.step", "ltr.plots", "ltr.engine.dist"}
    # In a package's __init__, one dot is the package itself.
    assert imports_of("from .step import x\nfrom .. import data\n", "ltr.engine", True, known) == {
        "ltr.engine.step", "ltr.data"}
    # A name that is not a submodule is an edge to the module it comes from.
    assert imports_of("from . import load, data\n", "ltr.plots", False, known) == {"ltr", "ltr.data"}
    # The version string is set before ltr/__init__.py imports anything: reading it is no edge.
    assert imports_of("from .. import __version__\n", "ltr.engine.dist", False, known) == set()


def test_cycle_finder_reports_the_path() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_covers_the_package() -> None:
    for mod in ("ltr", "ltr.train", "ltr.plots", "ltr.engine", "ltr.experiments.tables"):
        assert mod in GRAPH, f"{mod} not found under {PACKAGE}: the test reads the wrong tree"
    assert "ltr.data" in GRAPH["ltr.train"], "ltr.train's imports were not resolved"


# ---------------------------------------------------------------- the rules


def test_engine_never_reaches_above_itself() -> None:
    broken = []
    for mod in sorted(m for m in GRAPH if in_tree(m, ENGINE)):
        path = chain(GRAPH, mod, ABOVE_ENGINE)
        if path:
            broken.append(_show(path))
    assert not broken, (
        "the engine sits under the loop and must not import ltr.train, ltr.plots, ltr.runs or "
        "ltr.experiments (directly or through a chain):\n  " + "\n  ".join(broken)
    )


def test_only_the_top_imports_the_experiments() -> None:
    broken = [
        f"{mod} imports {dep}"
        for mod in sorted(GRAPH)
        if not in_tree(mod, EXPERIMENTS) and mod not in TOP
        for dep in sorted(GRAPH[mod])
        if in_tree(dep, EXPERIMENTS)
    ]
    allowed = ", ".join(sorted(TOP))
    assert not broken, (
        f"only {EXPERIMENTS}.* and {allowed} may import the experiments:\n  " + "\n  ".join(broken)
    )


def test_core_and_engine_never_reach_the_experiments() -> None:
    # The same rule through chains: a core module must not get to the experiments by way of the CLI or
    # the notebook helpers either.
    top = set(TOP) | {ENTRY}
    broken = []
    for mod in sorted(m for m in GRAPH if not in_tree(m, EXPERIMENTS) and m not in top):
        path = chain(GRAPH, mod, EXPERIMENTS, exact=top)
        if path:
            broken.append(_show(path))
    assert not broken, (
        "the core and the engine sit below the experiments, the CLI and the notebook helpers:\n  "
        + "\n  ".join(broken)
    )


def test_plots_never_reach_the_trainer() -> None:
    path = chain(GRAPH, "ltr.plots", "ltr.train")
    assert path is None, f"ltr.plots draws from run directories and must not import ltr.train: {_show(path)}"


def test_no_import_cycles() -> None:
    found = cycles(GRAPH)
    assert not found, "import cycles among ltr modules:\n  " + "\n  ".join(_show(c) for c in found)


def test_experiments_form_a_one_way_stack() -> None:
    # tuning (grids and kinds) < tables (plans, runners, tables) < sweep (which runs table rows).
    rules = [
        ("ltr.experiments.tables", "ltr.experiments.sweep"),
        ("ltr.experiments.tuning", "ltr.experiments.tables"),
        ("ltr.experiments.tuning", "ltr.experiments.sweep"),
    ]
    broken = []
    for low, high in rules:
        path = chain(GRAPH, low, high)
        if path:
            broken.append(f"{low} must not reach {high}: {_show(path)}")
    assert not broken, "\n".join(broken)
