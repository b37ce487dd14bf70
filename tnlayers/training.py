"""Checkpoint and resume a training run: model, optimizer (SAM/DAS/BAR state included), LR scheduler,
GradScaler and every random number generator, written atomically.

    save_checkpoint("run/last.pt", model, optimizer, scheduler, scaler, step=step)
    ...
    info = load_checkpoint("run/last.pt", model, optimizer, scheduler, scaler)  # in a fresh process
    start = info["step"] + 1

A resumed run continues bit for bit (same device, same thread count): the RNG states restored are torch's
CPU generator, every CUDA device's (when CUDA is initialized and present), numpy's global generator and
Python's ``random``. A data loader that draws its order from torch's global RNG, as ``DataLoader(shuffle=True)``
without a ``generator`` does, therefore replays the same order. The file is written to a temporary file in
the same directory, flushed to disk and renamed over the target, so a crash mid-save leaves the previous
checkpoint intact (and the next save to that path removes the dead save's temporary file). The file carries
a SHA-256 checksum (see ``tnlayers._checkpoint_file``) and the kind of each object saved; a truncated,
damaged or foreign file, or one whose optimizer/scheduler/scaler is of another kind than the one given, is
refused with a ValueError before anything is loaded, and if a restore step still fails, what was already
restored is rolled back: loading is all or nothing.

Under DistributedDataParallel every rank holds the same state: save on rank 0 only, load on every rank.
FSDP2-sharded models need ``torch.distributed.checkpoint`` instead (not handled here).

    >>> import os, tempfile, torch, tnlayers
    >>> model = torch.nn.Sequential(tnlayers.TTLinear(16, 16, rank=2), torch.nn.Linear(16, 2))
    >>> opt = tnlayers.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    >>> scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=10)
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = tnlayers.training.save_checkpoint(os.path.join(folder, "last.pt"), model, opt, scheduler, step=0)
    ...     tnlayers.training.load_checkpoint(path, model, opt, scheduler)["step"]
    0
"""
from __future__ import annotations

import collections
import copy
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from ._checkpoint_file import read_verified, write_atomic
from .layers.base import check_state_configs
from .rng_state import check_rng_state, get_rng_state, set_rng_state

__all__ = ["save_checkpoint", "load_checkpoint", "get_rng_state", "set_rng_state"]

FORMAT = "tnlayers-checkpoint"
VERSION = 2  # 2: SHA-256 zip comment and "kinds"; version-1 files still load (unchecked)
READABLE_VERSIONS = (1, 2)
PathLike = Union[str, os.PathLike]
# Exact types torch.load(weights_only=True) rebuilds; subclasses (enums, numpy scalars...) it refuses.
_PLAIN_TYPES = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size,
                torch.Tensor, nn.Parameter)
_CONTAINER_TYPES = (list, tuple, set, dict, collections.OrderedDict)


def _check_module(name: str, value: Any, kind, required: bool = False) -> None:
    if value is None and not required:
        return
    if not hasattr(value, "state_dict") or not hasattr(value, "load_state_dict") or (
            kind is not None and not isinstance(value, kind)):
        expected = kind.__name__ if kind is not None else "an object with state_dict/load_state_dict"
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}")


def _check_path(path: Any) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    return Path(path)


def _kind(obj: Any) -> Optional[str]:
    """What a state belongs to, compared at load: ``"DAS(SGD)"``, ``"Adam"``, ``"StepLR"``, ``"GradScaler"``."""
    if obj is None:
        return None
    if isinstance(obj, torch.amp.GradScaler):  # torch.cuda.amp.GradScaler is the same state
        return "GradScaler"
    base = getattr(obj, "base_optimizer", None)
    return f"{type(obj).__name__}({_kind(base)})" if isinstance(base, torch.optim.Optimizer) else type(obj).__name__


def _check_extra(value: Any, where: str = "extra", seen: Optional[set] = None) -> None:
    """Refuse at save what ``torch.load(weights_only=True)`` would refuse at load."""
    seen = set() if seen is None else seen
    kind = type(value)
    if kind in _PLAIN_TYPES:
        return
    if kind not in _CONTAINER_TYPES:
        raise TypeError(
            f"{where} is a {kind.__module__}.{kind.__qualname__}, which torch.load(weights_only=True) refuses, so "
            "the checkpoint would not load; nothing was written. Keep extra= to tensors, numbers, str, bool, None "
            "and lists, tuples and dicts of these (e.g. float(x) for a numpy number, torch.from_numpy(a) for an "
            "array, vars(args) for a Namespace)")
    if id(value) in seen:  # a container referenced twice (or itself) was checked already
        return
    seen.add(id(value))
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, item in items:
        if isinstance(value, dict):
            _check_extra(key, f"a key of {where}", seen)
        _check_extra(item, f"{where}[{key!r}]", seen)


def save_checkpoint(path: PathLike, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    scheduler: Any = None, scaler: Any = None, step: Optional[int] = None,
                    extra: Optional[Dict[str, Any]] = None) -> Path:
    """Write model, optimizer, scheduler, scaler, RNG states, ``step`` and ``extra`` to ``path`` atomically.

    ``extra`` holds anything else to resume (best accuracy, epoch...): tensors and plain Python values, so
    the file loads with ``weights_only=True`` (anything else is a TypeError here, not at load). The parent
    directory must exist. A failed write (disk full) raises an OSError and leaves ``path`` as it was.
    Returns the path.

        >>> import os, tempfile, torch, tnlayers
        >>> from tnlayers.training import load_checkpoint, save_checkpoint
        >>> model = torch.nn.Sequential(tnlayers.TTLinear(16, 16, rank=2), torch.nn.Linear(16, 2))
        >>> opt = tnlayers.DAS(model.parameters(), torch.optim.SGD, alpha=0.05, lr=0.1)
        >>> folder = tempfile.TemporaryDirectory()
        >>> path = save_checkpoint(os.path.join(folder.name, "last.pt"), model, opt, step=7, extra={"best": 0.9})
        >>> load_checkpoint(path, model, opt)
        {'step': 7, 'extra': {'best': 0.9}}
        >>> folder.cleanup()
    """
    path = _check_path(path)
    _check_module("model", model, nn.Module, required=True)
    _check_module("optimizer", optimizer, torch.optim.Optimizer)
    _check_module("scheduler", scheduler, None)
    _check_module("scaler", scaler, None)
    if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
        raise TypeError(f"step must be None or an int, got {type(step).__name__}")
    if step is not None and step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"extra must be a dict or None, got {type(extra).__name__}")
    _check_extra(extra or {})
    if getattr(optimizer, "_saved", None) is not None:  # SAM between first_step and second_step
        raise RuntimeError("optimizer: SAM is between first_step() and second_step(), so the model holds the "
                           "perturbed weights; save after second_step()/step()")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"path: directory {str(path.parent)!r} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"path: {str(path)!r} is a directory; give the checkpoint file's path")
    objects = {"optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
    payload = {
        "format": FORMAT, "version": VERSION, "step": step, "extra": extra or {},
        "model": model.state_dict(),
        **{name: None if obj is None else obj.state_dict() for name, obj in objects.items()},
        "kinds": {name: _kind(obj) for name, obj in objects.items()},
        "rng": get_rng_state(),
    }
    write_atomic(path, payload)
    return path


def _read(path: Path, map_location, weights_only: bool) -> Dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"path: no checkpoint file at {str(path)!r}")
    payload, verified = read_verified(path, map_location, weights_only)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a tnlayers checkpoint (written by tnlayers.training.save_checkpoint)")
    version = payload.get("version")
    if version not in READABLE_VERSIONS:
        raise ValueError(f"checkpoint {str(path)!r} has version {version!r}; this tnlayers reads versions "
                         f"{', '.join(map(str, READABLE_VERSIONS))} (a newer file needs a newer tnlayers)")
    if version >= 2 and not verified:  # every version-2 file carries its checksum: this one lost it
        raise ValueError(f"checkpoint {str(path)!r} is corrupt (its checksum record is missing or damaged) "
                         "and was not loaded; use an earlier checkpoint")
    if not isinstance(payload.get("model"), dict):
        raise ValueError(f"checkpoint {str(path)!r} holds no model state (no 'model' entry); it was not written "
                         "by tnlayers.training.save_checkpoint or was edited, and was not loaded")
    return payload


def _check_model_state(model: nn.Module, state: Dict[str, Any]) -> None:
    """Every mismatch found before anything is copied, so a bad checkpoint never half-loads a model."""
    own = model.state_dict()
    on_meta = [key for key, value in own.items() if isinstance(value, torch.Tensor) and value.is_meta]
    if on_meta:  # copying into a meta tensor is a no-op: the model would silently keep no values
        raise ValueError(f"the model has {len(on_meta)} parameters/buffers on the meta device ({on_meta[:5]}), "
                         "which hold no values to load into; materialize it first with "
                         "model.to_empty(device=...) (then build the optimizer) and load again")
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit the model: missing keys {missing[:5]}, unexpected keys "
                         f"{unexpected[:5]}")
    for key, value in own.items():
        saved = state[key]
        if isinstance(value, torch.Tensor) and (not isinstance(saved, torch.Tensor) or saved.shape != value.shape):
            shape = tuple(saved.shape) if isinstance(saved, torch.Tensor) else type(saved).__name__
            raise ValueError(f"checkpoint does not fit the model: {key!r} is {shape}, "
                             f"the model has {tuple(value.shape)}")
    check_state_configs(model, state)  # a 3x3 kernel's cores are not a 1x9 kernel's, though shapes match
    params = {name for name, _ in model.named_parameters()}
    for key, value in own.items():
        if isinstance(value, torch.Tensor):
            _check_finite(key, state[key], None if key in params else value)


def _check_finite(key: str, saved: torch.Tensor, own_buffer: Optional[torch.Tensor]) -> None:
    """NaN/inf refused in parameters, and in buffers unless the model's own buffer is non-finite at the same
    places (a -inf attention mask is by design; NaN BatchNorm statistics are not)."""
    if not (saved.is_floating_point() or saved.is_complex()):
        return
    bad = ~torch.isfinite(saved)
    if not bool(bad.any()):
        return
    if own_buffer is not None and not bool((bad & torch.isfinite(own_buffer).to(bad.device)).any()):
        return
    what = "parameter" if own_buffer is None else "buffer"
    raise ValueError(f"checkpoint holds non-finite values in {what} {key!r}; refusing to load it")


def _check_optimizer_state(optimizer: torch.optim.Optimizer, state: Any) -> None:
    groups = state.get("param_groups") if isinstance(state, dict) else None
    if not isinstance(groups, list):
        raise ValueError("checkpoint's optimizer state has no param_groups")
    saved = [len(g.get("params", ())) for g in groups]
    own = [len(g["params"]) for g in optimizer.param_groups]
    if saved != own:
        raise ValueError(f"checkpoint does not fit the optimizer: param group sizes {saved} vs {own}")
    check = getattr(optimizer, "check_state_dict", None)  # tnlayers optimizers validate without loading
    if callable(check):
        check(state)


def _check_kinds(path: Path, payload: Dict[str, Any], objects: Dict[str, Any]) -> None:
    """Another kind's state (DAS's into SAM, Adam's into DAS...) is refused by name before anything loads."""
    kinds = payload.get("kinds") or {}  # version 1 recorded none: restore steps then validate, with rollback
    for name, obj in objects.items():
        if obj is None:
            continue
        if payload.get(name) is None:
            raise ValueError(f"{name} was given but checkpoint {str(path)!r} holds no {name} state")
        saved, given = kinds.get(name), _kind(obj)
        if saved is not None and saved != given:
            raise ValueError(f"checkpoint {str(path)!r} holds the state of a {saved} {name}, but the {name} given is "
                             f"a {given}; build the same kind of {name} to resume (or leave {name}=None to load "
                             "the rest)")


def _model_snapshot(model: nn.Module) -> Dict[str, Any]:
    """A copy of the model's state, on its device: loading copies in place, so the old values need one."""
    return {k: v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
            for k, v in model.state_dict().items()}


def _snapshot_of(name: str, obj: Any) -> Callable[[], Any]:
    if name == "optimizer":  # its load_state_dict builds new state and never writes into the old tensors,
        return obj.state_dict  # so the old state_dict is a snapshot without copying the (large) buffers
    return lambda: copy.deepcopy(obj.state_dict())


# (take a snapshot, restore a state, the state to restore)
Step = Tuple[Callable[[], Any], Callable[[Any], None], Any]


def _restore_all(steps: List[Step]) -> None:
    """Run ``restore(value)`` for each step; if one fails, restore every snapshot taken (the failing step's
    included, it may have half-loaded) in reverse order and re-raise: all or nothing."""
    done: List[Tuple[Callable[[Any], None], Any]] = []
    try:
        for snapshot, restore, value in steps:
            done.append((restore, snapshot()))
            restore(value)
    except BaseException as error:
        for restore, before in reversed(done):
            try:
                restore(before)
            except Exception as rollback_error:  # keep the original error; say what could not be undone
                if hasattr(error, "add_note"):  # Python >= 3.11
                    error.add_note(f"tnlayers: rolling back after this error failed too: {rollback_error!r}")
        raise


def load_checkpoint(path: PathLike, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    scheduler: Any = None, scaler: Any = None, restore_rng: bool = True,
                    map_location: Any = "cpu", weights_only: bool = True) -> Dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote into ``model`` (and the optional objects) and, by default,
    the RNG states. Returns ``{"step": ..., "extra": {...}}``.

    The file's checksum is verified, and it is checked against the model (keys, shapes, finite parameters
    and buffers, no meta tensors) and against the kind of optimizer, scheduler and scaler given, before
    anything is changed; an object passed here whose part is missing from the checkpoint is a ValueError.
    Should a restore step still fail, everything already restored is rolled back and the error re-raised.
    Build the optimizer on the model's parameters *before* loading (as for ``torch.optim``); the model's
    parameters are copied in place, so the optimizer keeps referring to them.

        >>> import os, tempfile, torch, tnlayers
        >>> from tnlayers.training import load_checkpoint, save_checkpoint
        >>> folder = tempfile.TemporaryDirectory()
        >>> path = save_checkpoint(os.path.join(folder.name, "last.pt"), tnlayers.TTLinear(16, 16, rank=2), step=3)
        >>> resumed = tnlayers.TTLinear(16, 16, rank=2)  # e.g. in a fresh process
        >>> info = load_checkpoint(path, resumed)
        >>> start = info["step"] + 1
        >>> start
        4
        >>> load_checkpoint(path, tnlayers.TRLinear(16, 16, rank=2))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: ...
        >>> folder.cleanup()
    """
    path = _check_path(path)
    _check_module("model", model, nn.Module, required=True)
    _check_module("optimizer", optimizer, torch.optim.Optimizer)
    _check_module("scheduler", scheduler, None)
    _check_module("scaler", scaler, None)
    for name, flag in (("restore_rng", restore_rng), ("weights_only", weights_only)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    payload = _read(path, map_location, weights_only)
    _check_model_state(model, payload["model"])
    objects = {"optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
    _check_kinds(path, payload, objects)
    if optimizer is not None:
        _check_optimizer_state(optimizer, payload["optimizer"])
    if restore_rng:
        check_rng_state(payload.get("rng"))
    # The model goes last of the objects: its snapshot is the costly one, and is not needed when an
    # optimizer, scheduler or scaler refuses its state.
    steps: List[Step] = [(_snapshot_of(name, obj), obj.load_state_dict, payload[name])
                         for name, obj in objects.items() if obj is not None]
    steps.append((lambda: _model_snapshot(model), model.load_state_dict, payload["model"]))
    if restore_rng:
        steps.append((get_rng_state, set_rng_state, payload["rng"]))
    _restore_all(steps)
    return {"step": payload.get("step"), "extra": payload.get("extra", {})}
