"""Quieter third-party loggers, only while st_predict runs a step (restored on exit)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_logger(name: str, level: int = logging.WARNING) -> Iterator[None]:
    """Inside the block, the logger ``name`` drops records below ``level`` (a stricter level of the
    user's stays); on exit its level is what it was."""
    log = logging.getLogger(name)
    before = log.level
    log.setLevel(max(before, level))
    try:
        yield
    finally:
        log.setLevel(before)
