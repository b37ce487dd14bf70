"""Every global random number generator's state, captured and restored as plain Python/torch objects (so a
checkpoint holding it loads with ``torch.load(weights_only=True)``): torch's CPU generator, every CUDA
device's (when CUDA is initialized), numpy's global generator and Python's ``random``. Checkpoints
(``tnlayers/training.py``) save and restore it; ``tnlayers.training`` re-exports both functions."""
from __future__ import annotations

import random
from typing import Any, Dict

import torch

__all__ = ["get_rng_state", "set_rng_state", "check_rng_state"]


def get_rng_state() -> Dict[str, Any]:
    """Every global RNG state as plain Python/torch objects (loadable with ``weights_only=True``).

        >>> import torch
        >>> from tnlayers.training import get_rng_state, set_rng_state
        >>> state = get_rng_state()
        >>> first = torch.rand(3)
        >>> set_rng_state(state)
        >>> torch.equal(torch.rand(3), first)
        True
    """
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


def check_rng_state(state: Any) -> None:
    """A ValueError unless ``state`` is what :func:`get_rng_state` returns, restorable on this machine."""
    if not isinstance(state, dict) or "torch" not in state:
        raise ValueError("rng state must be a dict from tnlayers.training.get_rng_state()")
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) != torch.cuda.device_count():
        raise ValueError(f"the checkpoint holds {len(state['cuda'])} CUDA RNG states but "
                         f"{torch.cuda.device_count()} CUDA devices are visible")


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned.

        >>> import random
        >>> from tnlayers.training import get_rng_state, set_rng_state
        >>> state = get_rng_state()
        >>> draws = [random.random() for _ in range(3)]
        >>> set_rng_state(state)
        >>> [random.random() for _ in range(3)] == draws
        True
    """
    check_rng_state(state)
    torch.set_rng_state(state["torch"])
    if "python" in state:
        random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))


def _to_lists(value):
    return [_to_lists(v) for v in value] if isinstance(value, tuple) else value


def _to_tuples(value):
    return tuple(_to_tuples(v) for v in value) if isinstance(value, list) else value
