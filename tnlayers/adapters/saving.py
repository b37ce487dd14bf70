"""Adapters saved on their own, as PEFT's ``save_pretrained`` / ``from_pretrained`` save and load theirs: a
folder with ``adapter_model.safetensors`` (each adapter's cores, as ``<layer>.cores.<k>``; no base weight)
and ``adapter_config.json`` (per adapted layer: its format, rank, alpha, dropout, init, strategy, ΔW's mode
split, the layer's class and weight shape, every place it is registered; and the tnlayers version).

``load_adapters`` adapts a fresh base model with that configuration and loads the cores: the model then
computes what the saved one did, bit for bit on the same device and dtype. A merged model saves the same
cores; the loaded adapters start unmerged. The safetensors package is needed (``pip install safetensors``),
imported only when these functions run.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Dict, List, Union

import torch
from torch import nn

from ..selection import _close_matches_hint, _swap
from .adapter import Adapter
from .model import _adapters_of, adapt, named_adapters

__all__ = ["save_adapters", "load_adapters", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FILE_VERSION = 1  # of the config's layout ("tnlayers_adapters" holds it)
OPTIONS = ("format", "rank", "alpha", "dropout", "init", "strategy")  # adapt's options, grouped by them on load
FIELDS = OPTIONS + ("places", "layer", "weight_shape", "out_shape", "in_shape", "cores")


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise ImportError("save_adapters / load_adapters read and write safetensors files: pip install safetensors"
                          ) from None
    return safetensors.torch


def _places(model: nn.Module) -> Dict[int, List[str]]:
    """{id(adapter): every name it is registered under}."""
    places: Dict[int, List[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, Adapter):
            places.setdefault(id(module), []).append(name)
    return places


def _layer_config(adapter: Adapter, places: List[str]) -> dict:
    dropout = adapter.dropout.p if isinstance(adapter.dropout, nn.Dropout) else 0.0
    return {"format": adapter.format, "rank": adapter.rank, "alpha": adapter.alpha, "dropout": dropout,
            "init": adapter.init, "strategy": adapter.strategy, "places": places, "layer": type(adapter.base).__name__,
            "weight_shape": list(adapter.base.weight.shape), "out_shape": list(adapter.out_shape),
            "in_shape": list(adapter.in_shape), "cores": [list(c.shape) for c in adapter.cores]}


def _dumps(config: dict) -> str:
    """JSON, indented, one line per layer (not one per number of every shape)."""
    head = json.dumps({k: v for k, v in config.items() if k != "layers"}, indent=2)[:-2]  # without "\n}"
    layers = ",\n".join(f"    {json.dumps(name)}: {json.dumps(layer)}" for name, layer in config["layers"].items())
    return f'{head},\n  "layers": {{\n{layers}\n  }}\n}}\n'


def save_adapters(model: nn.Module, directory: Union[str, os.PathLike]) -> Path:
    """Write the model's adapters to ``directory`` (created if missing): ``adapter_model.safetensors`` with
    the cores alone and ``adapter_config.json``; returns the folder. :func:`load_adapters` reads them back.

        >>> import copy, tempfile, torch, tnlayers
        >>> from torch import nn
        >>> base = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> fresh = copy.deepcopy(base)  # the base model, as it will be loaded again
        >>> model = tnlayers.adapt(base, "tt", rank=2, target_modules=["0"], init="random")
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = tnlayers.adapters.save_adapters(model, folder)
        ...     print(sorted(p.name for p in path.iterdir()))
        ...     loaded = tnlayers.adapters.load_adapters(fresh, folder)
        ['adapter_config.json', 'adapter_model.safetensors']
        >>> x = torch.randn(3, 16)
        >>> torch.equal(loaded(x), model(x))
        True
    """
    _adapters_of(model, "save_adapters")
    if isinstance(model, Adapter):
        raise ValueError("save_adapters: give the model that holds the adapters, not an adapter alone (load_adapters "
                         "wraps the layers of a model)")
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory must be a str or os.PathLike, got {type(directory).__name__}")
    st = _safetensors()
    places = _places(model)
    layers, tensors = {}, {}
    for name, adapter in named_adapters(model):
        layers[name] = _layer_config(adapter, places[id(adapter)])
        for k, core in enumerate(adapter.cores):
            tensors[f"{name}.cores.{k}"] = core.detach().cpu().contiguous()
    config = {"tnlayers_adapters": FILE_VERSION, "tnlayers_version": getattr(sys.modules.get("tnlayers"),
                                                                           "__version__", "unknown"),
              "base_model": type(model).__name__, "target_modules": [p for layer in layers.values()
                                                                     for p in layer["places"]], "layers": layers}
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    # written beside, then renamed: an interrupted save leaves the previous files whole
    weights, text = folder / (WEIGHTS_NAME + ".partial"), folder / (CONFIG_NAME + ".partial")
    st.save_file(tensors, str(weights), metadata={"format": "pt"})
    text.write_text(_dumps(config), encoding="utf-8")
    os.replace(weights, folder / WEIGHTS_NAME)
    os.replace(text, folder / CONFIG_NAME)
    return folder


def _read(folder: Path):
    """(layers config, {key: tensor}) after checking the files' own consistency."""
    paths = [folder / CONFIG_NAME, folder / WEIGHTS_NAME]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"load_adapters: {str(folder)!r} lacks {missing} (save_adapters writes both)")
    try:
        config = json.loads(paths[0].read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"load_adapters: {paths[0]} is not valid JSON ({err})") from None
    version = config.get("tnlayers_adapters") if isinstance(config, dict) else None
    if version != FILE_VERSION:
        raise ValueError(f"load_adapters: {paths[0]} is not a tnlayers adapter config of version {FILE_VERSION} "
                         f"(its 'tnlayers_adapters' is {version!r}); save_adapters writes one")
    layers = config.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise ValueError(f"load_adapters: {paths[0]} lists no layers")
    for name, layer in layers.items():
        lacking = [f for f in FIELDS if not isinstance(layer, dict) or f not in layer]
        if lacking:
            raise ValueError(f"load_adapters: layer {name!r} of {paths[0]} lacks {lacking}")
    tensors = _safetensors().load_file(str(paths[1]))
    expected = {f"{name}.cores.{k}": tuple(shape) for name, layer in layers.items()
                for k, shape in enumerate(layer["cores"])}
    absent, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if absent or extra:
        raise ValueError(f"load_adapters: {WEIGHTS_NAME} does not match {CONFIG_NAME}: missing keys {absent}, "
                         f"unexpected keys {extra}")
    wrong = [f"{key}: {tuple(tensors[key].shape)} in the file, {shape} in the config"
             for key, shape in expected.items() if tuple(tensors[key].shape) != shape]
    if wrong:
        raise ValueError(f"load_adapters: shape mismatch in {WEIGHTS_NAME}: {'; '.join(wrong)}")
    return layers, tensors


def _hint(place: str, names: List[str]) -> str:
    """The model's names that differ from ``place`` by a prefix (a wrapper such as PeftModel adds one), else the
    close matches."""
    prefixed = [n for n in names if n.endswith("." + place) or (n and place.endswith("." + n))]
    return f"names that differ by a prefix: {prefixed[:5]}" if prefixed else _close_matches_hint(place, names[1:])


def _check_model(model: nn.Module, layers: dict) -> None:
    """Each saved place names a layer of the model of the saved class and weight shape."""
    modules = dict(model.named_modules(remove_duplicate=False))
    for name, layer in layers.items():
        for place in layer["places"]:
            module = modules.get(place)
            if module is None:
                raise ValueError(f"load_adapters: the model has no module {place!r}: the adapters were saved from a "
                                 f"model of another structure (load into the base model as it was when saved, PEFT "
                                 f"wrapping included); {_hint(place, list(modules))}")
            if isinstance(module, Adapter):
                raise ValueError(f"load_adapters: {place!r} is already adapted ({type(module).__name__}); load into "
                                 f"the base model (unadapt(model) gives its layers back)")
            shape = list(getattr(module, "weight", torch.empty(0)).shape)
            if type(module).__name__ != layer["layer"] or shape != layer["weight_shape"]:
                raise ValueError(f"load_adapters: {place!r} is a {type(module).__name__} with weight {shape}; the "
                                 f"adapter was saved on a {layer['layer']} with weight {layer['weight_shape']}")


def load_adapters(model: nn.Module, directory: Union[str, os.PathLike], *, freeze_model: bool = True) -> nn.Module:
    """Adapt ``model`` (a fresh base model, in place) as :func:`save_adapters` recorded, and load the saved
    cores; returns the model. The cores take the base weights' device and dtype (as ``adapt`` gives them),
    the saved values cast to it. ``freeze_model`` as for :func:`adapt`. Strict: a missing layer, another
    layer class or weight shape, missing or unexpected keys and shape mismatches are errors, raised before
    the model changes. Example: :func:`save_adapters`.

        >>> import tnlayers
        >>> from torch import nn
        >>> tnlayers.adapters.load_adapters(nn.Linear(2, 2), "no-such-folder")
        Traceback (most recent call last):
        FileNotFoundError: load_adapters: 'no-such-folder' lacks ['adapter_config.json', ...] (save_adapters ...
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_adapters expects an nn.Module, got {type(model).__name__}")
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory must be a str or os.PathLike, got {type(directory).__name__}")
    layers, tensors = _read(Path(directory))
    _check_model(model, layers)
    groups: Dict[str, List[str]] = {}  # one adapt call per set of options (as JSON: adapt checks the values)
    for name, layer in layers.items():
        groups.setdefault(json.dumps([layer[o] for o in OPTIONS]), []).append(name)
    split = {place: {"out_shape": tuple(layer["out_shape"]), "in_shape": tuple(layer["in_shape"])}
             for layer in layers.values() for place in layer["places"]}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    before = {id(a) for _, a in named_adapters(model)}
    try:
        for options, names in groups.items():
            options = dict(zip(OPTIONS, json.loads(options)))
            places = [place for name in names for place in layers[name]["places"]]
            exact = "|".join(re.escape(place) for place in places)  # a full-match regex: these names alone
            adapt(model, target_modules=f"(?:{exact})", shapes=lambda place, layer: split[place],
                  freeze_model=freeze_model, **options)
        with torch.no_grad():
            for name in layers:
                adapter = model.get_submodule(name)
                for k, core in enumerate(adapter.cores):
                    if core.shape != tensors[f"{name}.cores.{k}"].shape:  # another tnlayers' layout of the cores
                        raise ValueError(f"load_adapters: {name}.cores.{k} is {tuple(core.shape)} here, "
                                         f"{tuple(tensors[f'{name}.cores.{k}'].shape)} in the file")
                    core.copy_(tensors[f"{name}.cores.{k}"])
    except (TypeError, ValueError) as err:  # all or nothing: the new adapters go, the flags come back
        _swap(model, lambda name, child: child.base if isinstance(child, Adapter) and id(child) not in before
              else None)
        for p, flag in flags:
            p.requires_grad_(flag)
        if str(err).startswith("load_adapters"):
            raise
        raise type(err)(f"load_adapters: {err}") from err
    return model
