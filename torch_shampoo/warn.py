"""Warnings that point at the user's line: :func:`user_stacklevel`."""

from __future__ import annotations

import os
import sys

import torch

__all__ = ["user_stacklevel"]

_LIBRARY_DIRS = (os.path.dirname(__file__) + os.sep, os.path.dirname(torch.__file__) + os.sep)


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning issued by our caller point at the user's line
    (the first frame outside this package and torch: the call of ``optimizer.step()``)."""
    level, frame = 2, sys._getframe(2)
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_LIBRARY_DIRS):
        level, frame = level + 1, frame.f_back
    return level
