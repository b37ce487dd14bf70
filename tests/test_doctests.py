"""The public API documents itself with examples that run: every module's doctests pass (one case per module),
every public name has a docstring with at least one ``>>>`` example and type hints on its signature, and the
``__all__`` lists agree with each other (each name exists; a name exported in two places is one object).

The public API: ``tnlayers.__all__`` and the ``__all__`` of the subpackages and modules users import from
(``optim``, ``adapters``, ``lr``, ``models``, ``training``, ``metrics``, ``types``)."""
from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil
import random
import sys
import warnings
from typing import Dict, List

import pytest
import torch

import tnlayers

PUBLIC_MODULES = ("tnlayers", "tnlayers.optim", "tnlayers.adapters", "tnlayers.lr", "tnlayers.models",
                  "tnlayers.training", "tnlayers.metrics", "tnlayers.types")
# Top-level names that are a subpackage's name under another name (the same object).
ALIASES = {"merge_adapters": "tnlayers.adapters.merge", "unmerge_adapters": "tnlayers.adapters.unmerge",
           "norm_deviation": "tnlayers.metrics.norm_deviation", "norm_report": "tnlayers.metrics.norm_report"}
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
SKIPPED_MODULES = ("tnlayers.__main__", "tnlayers.kernels.das_triton")  # a script; needs triton, no examples


def _all_modules() -> List[str]:
    names = ["tnlayers"]
    for info in pkgutil.walk_packages(tnlayers.__path__, "tnlayers."):
        if info.name not in SKIPPED_MODULES:
            names.append(info.name)
    return sorted(names)


def _doctests(module_name: str) -> List[doctest.DocTest]:
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:  # an optional dependency missing (triton...): nothing of tnlayers' own
        if (error.name or "").startswith("tnlayers"):
            raise
        return []
    return [t for t in doctest.DocTestFinder().find(module, module_name) if t.examples]


MODULES_WITH_EXAMPLES = [name for name in _all_modules() if _doctests(name)]


@pytest.fixture
def isolated_state():
    """A doctest draws random numbers and may set a strategy: leave the next test the state it had."""
    python_state = random.getstate()
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # examples that warn (a rank above a mode's size) say so in their text
        yield
    random.setstate(python_state)
    tnlayers.set_strategy(None)


@pytest.mark.parametrize("module_name", MODULES_WITH_EXAMPLES)
def test_doctests_pass(module_name, isolated_state):
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    failures = []
    for test in _doctests(module_name):
        result = runner.run(test, out=failures.append)
        assert result.attempted > 0
    assert runner.failures == 0, "".join(failures)


def test_the_doctests_cover_the_public_modules():
    assert len(MODULES_WITH_EXAMPLES) >= 30, MODULES_WITH_EXAMPLES
    for name in PUBLIC_MODULES:
        assert name in MODULES_WITH_EXAMPLES, f"{name} has no doctest"


# -- __all__ -------------------------------------------------------------------------------------------------
def _public() -> Dict[str, object]:
    """{"module.name": object} for every name of every public module's __all__."""
    out = {}
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            assert hasattr(module, name), f"{module_name}.__all__ lists {name!r}, which it does not define"
            out[f"{module_name}.{name}"] = getattr(module, name)
    return out


def test_all_lists_name_existing_objects_without_duplicates():
    for module_name in PUBLIC_MODULES:
        names = importlib.import_module(module_name).__all__
        assert len(names) == len(set(names)), f"{module_name}.__all__ repeats a name"
    _public()


def test_names_exported_in_several_places_are_one_object():
    public = _public()
    for top, other in ALIASES.items():
        assert getattr(tnlayers, top) is public[other], f"tnlayers.{top} is not {other}"
    by_name: Dict[str, list] = {}
    for qualified, obj in public.items():
        by_name.setdefault(qualified.rsplit(".", 1)[1], []).append((qualified, obj))
    for name, places in by_name.items():
        assert all(obj is places[0][1] for _, obj in places), f"{name} names different objects: {places}"
    # every submodule listed at the top level is that submodule
    for name in tnlayers.__all__:
        if inspect.ismodule(getattr(tnlayers, name)):
            assert getattr(tnlayers, name) is sys.modules[f"tnlayers.{name}"]


def test_adapter_and_metric_names_are_exported_where_users_look():
    import tnlayers.adapters
    import tnlayers.metrics
    import tnlayers.optim

    assert {"adapt", "unadapt", "merge_adapters", "unmerge_adapters", "trainable_parameters"} <= set(tnlayers.__all__)
    assert {"merge", "unmerge", "unadapt", "PAPER_PRESETS"} <= set(tnlayers.adapters.__all__)
    assert {"squared_norms", "norm_deviation", "norm_report", "NormDynamics"} <= set(tnlayers.metrics.__all__)
    assert tnlayers.metrics.NormDynamics is tnlayers.optim.NormDynamics
    # the old import paths keep working
    from tnlayers.adapters import PAPER_PRESETS, unadapt
    from tnlayers.optim import NormDynamics
    from tnlayers.optim.dynamics import NormDynamics as same

    assert same is NormDynamics is tnlayers.metrics.NormDynamics
    assert unadapt is tnlayers.unadapt and "flora" in PAPER_PRESETS


# -- examples ------------------------------------------------------------------------------------------------
def _example_sources() -> str:
    """The source of every doctest example in tnlayers (to find data names, which carry no docstring)."""
    return "\n".join(e.source for name in MODULES_WITH_EXAMPLES for t in _doctests(name) for e in t.examples)


def test_every_public_name_has_an_example():
    sources = _example_sources()
    missing = []
    for qualified, obj in _public().items():
        name = qualified.rsplit(".", 1)[1]
        if qualified.startswith("tnlayers.types."):
            continue  # type aliases carry no docstring of their own: the module's example uses them
        if inspect.ismodule(obj) or inspect.isclass(obj) or callable(obj):
            doc = obj.__doc__ if (inspect.ismodule(obj) or inspect.isclass(obj)) else inspect.getdoc(obj)
            if not doc or ">>>" not in doc:
                missing.append(qualified)
        elif name not in sources:  # data (FORMATS, PAPER_PRESETS, TABLE9, ...): used in some example
            missing.append(qualified)
    assert not missing, f"public names without a >>> example in their docstring: {missing}"


# -- type hints ----------------------------------------------------------------------------------------------
def _signatures():
    """(qualified name, callable) for every public function, class constructor and public method defined
    in tnlayers."""
    seen = set()
    for qualified, obj in _public().items():
        if inspect.isclass(obj):
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            for cls in obj.__mro__:
                if not cls.__module__.startswith("tnlayers"):
                    continue
                for attr, member in vars(cls).items():
                    if attr.startswith("_") and attr not in ("__init__", "__call__"):
                        continue
                    if isinstance(member, (classmethod, staticmethod)):
                        member = member.__func__
                    elif isinstance(member, property):
                        member = member.fget
                    if inspect.isfunction(member):
                        yield f"{qualified}.{attr}", member
        elif inspect.isfunction(obj) and id(obj) not in seen:
            seen.add(id(obj))
            yield qualified, obj


def test_public_signatures_have_type_hints():
    missing = []
    for qualified, func in _signatures():
        signature = inspect.signature(func)
        for name, param in signature.parameters.items():
            if name in ("self", "cls") or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            if param.annotation is inspect.Parameter.empty:
                missing.append(f"{qualified}({name})")
        if func.__name__ != "__init__" and signature.return_annotation is inspect.Signature.empty:
            missing.append(f"{qualified} -> ?")
    assert not missing, f"public signatures without type hints: {missing}"


@pytest.mark.skipif(sys.version_info < (3, 10), reason="X | Y annotations evaluate from Python 3.10")
def test_public_type_hints_resolve():
    import typing

    for qualified, func in _signatures():
        typing.get_type_hints(func)  # a NameError here: an annotation names something its module lacks
