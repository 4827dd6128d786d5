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


class _StdoutHandler(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stdout`` is when a record is emitted (a notebook's, a test's
    capture), not the one of the moment it was made."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):
        import sys

        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # logging.StreamHandler.__init__ sets it
        pass


def progress_logger() -> logging.Logger:
    """``st_predict.progress``: the lines that tell a user where a long job is (an epoch done, a fold model
    started, the tiles of a slide), shown on stdout at ``INFO`` by default. ``logging.getLogger("st_predict.
    progress").setLevel(logging.WARNING)`` silences them."""
    log = logging.getLogger("st_predict.progress")
    if not log.handlers:
        log.addHandler(_StdoutHandler())
        log.setLevel(logging.INFO)
        log.propagate = False
    return log
