"""Warnings attributed to the user's line, not to st_predict's or a decorator's."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings

#: st_predict itself (this file is st_predict/_utils/_warnings.py)
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: frames that are never the caller: st_predict itself and the wrappers between it and the user
_SKIP = (_PACKAGE_DIR, os.path.dirname(contextlib.__file__) + os.sep + "contextlib.py", os.sep + "_contextlib.py",
         os.sep + "functools.py")


def _is_internal(filename: str) -> bool:
    path = os.path.abspath(filename)
    return path.startswith(_PACKAGE_DIR + os.sep) or path.endswith(_SKIP[1:])


def user_stacklevel() -> int:
    """The ``stacklevel`` for :func:`warnings.warn`, called from the function that calls this, that
    names the first frame outside st_predict (and outside the decorators around its functions)."""
    frame = sys._getframe(1)  # the caller of user_stacklevel, i.e. the frame that calls warnings.warn
    level = 1
    while frame is not None and _is_internal(frame.f_code.co_filename):
        frame = frame.f_back
        level += 1
    return level


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """:func:`warnings.warn` attributed to the user's code that called into st_predict."""
    warnings.warn(message, category, stacklevel=user_stacklevel())
