"""Warnings that point at the user's line, however deep inside tnlayers they are raised."""
from __future__ import annotations

import os
import sys
import warnings

__all__ = ["user_stacklevel", "warn_user"]

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes ``warnings.warn``, called by this function's caller, name the first
    frame outside the tnlayers package: a fixed number breaks as soon as the call path changes (direct
    construction, ``from_dense``, ``tensorize`` reach the same warning at different depths)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    return level


def warn_user(message: str, category: type = UserWarning) -> None:
    """``warnings.warn`` attributed to the user's line (the first caller outside tnlayers)."""
    warnings.warn(message, category, stacklevel=user_stacklevel())
