"""Imports of dependencies that talk on import."""

from __future__ import annotations

import warnings


def import_squidpy():
    """``import squidpy``, without docrep's ``SyntaxWarning: 'n_jobs' is not a valid key!`` lines, which
    squidpy's docstring templates emit on import (about squidpy's docstrings, nothing a user can act on)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=SyntaxWarning, message=r".*is not a valid key.*")
        import squidpy

    return squidpy
