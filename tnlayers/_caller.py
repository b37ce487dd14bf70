"""Warnings that point at the user's line, however deep inside tnlayers they are raised."""
from __future__ import annotations

import os
import sys
import warnings

import torch

__all__ = ["user_stacklevel", "warn_user"]

# frames of these packages are not the user's: tnlayers' own, and torch's (nn.Module.__call__, optimizer step
# hooks, GradScaler.step) through which a user's call reaches tnlayers
_INTERNAL = tuple(os.path.dirname(os.path.abspath(f)) + os.sep for f in (__file__, torch.__file__))


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes ``warnings.warn``, called by this function's caller, name the first
    frame outside tnlayers and torch: a fixed number breaks as soon as the call path changes (direct
    construction, ``from_dense``, ``tensorize`` reach the same warning at different depths)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    return level


def warn_user(message: str, category: type = UserWarning) -> None:
    """``warnings.warn`` attributed to the user's line (the first caller outside tnlayers and torch)."""
    warnings.warn(message, category, stacklevel=user_stacklevel())
