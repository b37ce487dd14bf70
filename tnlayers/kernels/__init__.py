"""Triton kernels for the DAS step (their own issue). Nothing here imports triton at package import:
availability is checked with ``importlib.util.find_spec`` and the kernels load on first use."""
from __future__ import annotations

import importlib.util

__all__ = ["triton_available"]


def triton_available() -> bool:
    """Whether the triton package is installed (does not import it, and does not touch CUDA)."""
    return importlib.util.find_spec("triton") is not None
