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
checkpoint intact; a truncated or foreign file is refused with a ValueError before anything is loaded.

Under DistributedDataParallel every rank holds the same state: save on rank 0 only, load on every rank.
FSDP2-sharded models need ``torch.distributed.checkpoint`` instead (not handled here).
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from torch import nn

__all__ = ["save_checkpoint", "load_checkpoint", "get_rng_state", "set_rng_state"]

FORMAT = "tnlayers-checkpoint"
VERSION = 1
PathLike = Union[str, os.PathLike]
_UMASK = os.umask(0)
os.umask(_UMASK)


def get_rng_state() -> Dict[str, Any]:
    """Every global RNG state as plain Python/torch objects (loadable with ``weights_only=True``)."""
    state: Dict[str, Any] = {"torch": torch.get_rng_state(), "python": _to_lists(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:  # numpy is optional for this helper
        return state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)]
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned."""
    if not isinstance(state, dict) or "torch" not in state:
        raise ValueError("rng state must be a dict from tnlayers.training.get_rng_state()")
    torch.set_rng_state(state["torch"])
    if "python" in state:
        random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) != torch.cuda.device_count():
            raise ValueError(f"the checkpoint holds {len(state['cuda'])} CUDA RNG states but "
                             f"{torch.cuda.device_count()} CUDA devices are visible")
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))


def _to_lists(value):
    return [_to_lists(v) for v in value] if isinstance(value, tuple) else value


def _to_tuples(value):
    return tuple(_to_tuples(v) for v in value) if isinstance(value, list) else value


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


def save_checkpoint(path: PathLike, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    scheduler: Any = None, scaler: Any = None, step: Optional[int] = None,
                    extra: Optional[Dict[str, Any]] = None) -> Path:
    """Write model, optimizer, scheduler, scaler, RNG states, ``step`` and ``extra`` to ``path`` atomically.

    ``extra`` holds anything else to resume (best accuracy, epoch...); keep it to tensors and plain Python
    values so the file loads with ``weights_only=True``. The parent directory must exist. Returns the path.
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
    if getattr(optimizer, "_saved", None) is not None:  # SAM between first_step and second_step
        raise RuntimeError("optimizer: SAM is between first_step() and second_step(), so the model holds the "
                           "perturbed weights; save after second_step()/step()")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"path: directory {str(path.parent)!r} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"path: {str(path)!r} is a directory; give the checkpoint file's path")
    payload = {
        "format": FORMAT, "version": VERSION, "step": step, "extra": extra or {},
        "model": model.state_dict(),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "scaler": None if scaler is None else scaler.state_dict(),
        "rng": get_rng_state(),
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes the file private; give it the usual permissions
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read(path: Path, map_location, weights_only: bool) -> Dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"path: no checkpoint file at {str(path)!r}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as error:  # truncated zip, foreign pickle, ...
        raise ValueError(f"checkpoint {str(path)!r} is corrupt or truncated and was not loaded: {error}") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a tnlayers checkpoint (written by tnlayers.training.save_checkpoint)")
    if payload.get("version") != VERSION:
        raise ValueError(f"checkpoint {str(path)!r} has version {payload.get('version')!r}; "
                         f"this tnlayers reads {VERSION}")
    return payload


def _check_model_state(model: nn.Module, state: Dict[str, Any]) -> None:
    """Every mismatch found before anything is copied, so a bad checkpoint never half-loads a model."""
    own = model.state_dict()
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
    params = {name for name, _ in model.named_parameters()}
    for key in params & set(state):
        saved = state[key]
        if saved.is_floating_point() and not bool(torch.isfinite(saved).all()):
            raise ValueError(f"checkpoint holds non-finite values in parameter {key!r}; refusing to load it")


def _check_optimizer_state(optimizer: torch.optim.Optimizer, state: Any) -> None:
    groups = state.get("param_groups") if isinstance(state, dict) else None
    if not isinstance(groups, list):
        raise ValueError("checkpoint's optimizer state has no param_groups")
    saved = [len(g.get("params", ())) for g in groups]
    own = [len(g["params"]) for g in optimizer.param_groups]
    if saved != own:
        raise ValueError(f"checkpoint does not fit the optimizer: param group sizes {saved} vs {own}")


def load_checkpoint(path: PathLike, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    scheduler: Any = None, scaler: Any = None, restore_rng: bool = True,
                    map_location: Any = "cpu", weights_only: bool = True) -> Dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote into ``model`` (and the optional objects) and, by default,
    the RNG states. Returns ``{"step": ..., "extra": {...}}``.

    The file is read and checked against the model (keys, shapes, finite parameters) before anything is
    changed; an object passed here whose part is missing from the checkpoint is a ValueError. Build the
    optimizer on the model's parameters *before* loading (as for ``torch.optim``); the model's parameters
    are copied in place, so the optimizer keeps referring to them.
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
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if obj is not None and payload.get(name) is None:
            raise ValueError(f"{name} was given but checkpoint {str(path)!r} holds no {name} state")
    if optimizer is not None:
        _check_optimizer_state(optimizer, payload["optimizer"])
    model.load_state_dict(payload["model"])
    if optimizer is not None:
        optimizer.load_state_dict(payload["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(payload["scheduler"])
    if scaler is not None:
        scaler.load_state_dict(payload["scaler"])
    if restore_rng:
        set_rng_state(payload["rng"])
    return {"step": payload.get("step"), "extra": payload.get("extra", {})}

