"""The import graph of ``tnlayers/`` has no cycle, lazy imports included: every arrow points one way.

The graph is built from the source (AST), not from ``sys.modules``, so an import inside a function (a lazy
import, which hides a cycle from ``import tnlayers``) is an edge like any other. Its rules:

- every ``import x`` / ``from x import y`` anywhere in a module is an edge (module level, in functions, in
  ``if TYPE_CHECKING:`` blocks alike); relative imports are resolved against the importing module's package;
- ``import pkg`` or ``from pkg import name`` (``name`` not a submodule) is an edge to ``pkg/__init__.py``;
  ``from pkg import sub`` where ``sub`` is a submodule is an edge to that submodule;
- ``import a.b.c`` / ``from a.b.c import y`` is an edge to ``a.b.c`` and to the packages ``a`` and ``a.b``
  (Python runs their ``__init__`` first), except those packages the importing module lies in: their
  ``__init__`` is already running or done when it runs, so that arrow is the interpreter's, not a
  dependency the code chose. So ``from ..groups import x`` inside ``tnlayers/layers/`` is an edge to
  ``tnlayers/groups.py``, not to ``tnlayers/__init__.py``; ``from .adapters.adapter import Adapter`` in
  ``tnlayers/conversion_plan.py`` is an edge to ``tnlayers/adapters/__init__.py`` too (it runs that ``__init__``,
  which imports the whole package); and ``from .. import x`` with ``x`` not a submodule is an edge to
  ``tnlayers/__init__.py``, which imports everything, and so is a cycle.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Optional, Set

import tnlayers

ROOT = Path(tnlayers.__file__).resolve().parent
PACKAGE = "tnlayers"


def _modules() -> Dict[str, Path]:
    """{dotted module name: file}, a package as its ``__init__.py``."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = (PACKAGE,) + path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _resolve(module: str, path: Path, level: int, target: Optional[str]) -> str:
    """The absolute name of ``from <level dots><target> import ...`` written in ``module``."""
    if level == 0:
        return target or ""
    package = module.split(".") if _is_package(path) else module.split(".")[:-1]
    base = package[:len(package) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _with_packages(importer: str, target: str) -> Set[str]:
    """``target`` and the packages above it whose ``__init__`` importing it runs (not the importer's own)."""
    parts = target.split(".")
    prefixes = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    own = importer.split(".")
    return {p for p in prefixes if own[:len(p.split("."))] != p.split(".")}


def import_graph() -> Dict[str, Set[str]]:
    """{module: {modules of tnlayers it imports}}, by the rules of the module docstring."""
    modules = _modules()
    graph: Dict[str, Set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                source = _resolve(name, path, node.level, node.module)
                targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                           for alias in node.names]
            else:
                continue
            for target in targets:
                graph[name].update(_with_packages(name, target) & set(modules))
            unknown = [t for t in targets if t.split(".")[0] == PACKAGE and t not in modules]
            assert not unknown, f"{name} imports {unknown}, which is no module of tnlayers"
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One cycle [a, b, ..., a] of the graph, or None (iterative depth-first search, three colours)."""
    state: Dict[str, int] = {}  # absent: unvisited, 1: on the current path, 2: done
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_the_module_graph_of_tnlayers_has_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle in tnlayers/ (lazy imports count): " + " -> ".join(cycle)


def test_the_graph_sees_lazy_imports_and_submodule_imports():
    graph = import_graph()
    assert len(graph) > 40 and "tnlayers.adapters" in graph["tnlayers"]
    # `from . import lora` in adapters/delta.py is an edge to the submodule, not to the package
    assert "tnlayers.adapters.lora" in graph["tnlayers.adapters.delta"]
    assert "tnlayers.adapters" not in graph["tnlayers.adapters.delta"]
    # a lazy import (inside a function) is an edge: das.py loads the Triton kernels only when they run
    assert "tnlayers.kernels.das_triton" in graph["tnlayers.optim.das"]
    # importing a submodule of another package runs that package's __init__: conversion_plan -> adapters/__init__
    assert {"tnlayers.adapters", "tnlayers.adapters.adapter"} <= graph["tnlayers.conversion_plan"]
    # ... and not one's own package's: layers/conv.py -> groups-level modules, not tnlayers/__init__
    assert "tnlayers" not in graph["tnlayers.layers.conv"]


def test_find_cycle_reports_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_no_function_shadows_a_module():
    """``tnlayers.x`` is module ``x`` for every file ``x.py``: an exported function of the same name would
    hide it (``tnlayers.tensorize.summary`` failed while ``tensorize.py`` held ``tensorize``)."""
    import importlib

    for name in _modules():
        parent, _, leaf = name.rpartition(".")
        if parent and not leaf.startswith("_") and leaf != "__main__":
            try:
                module = importlib.import_module(name)
            except ImportError:  # an optional dependency (triton) missing: nothing to shadow then
                continue
            assert getattr(importlib.import_module(parent), leaf) is module, f"{parent}.{leaf} is not the module {name}"


def test_old_import_paths_still_work():
    import tnlayers.convert
    from tnlayers.summary import Summary
    from tnlayers.tensorize import summary, tensorize, to_dense

    assert tensorize is tnlayers.tensorize and summary is tnlayers.summary and to_dense is tnlayers.to_dense
    assert callable(tnlayers.tensorize) and tnlayers.convert.summary is tnlayers.summary
    assert Summary is tnlayers.compression_report.Summary
