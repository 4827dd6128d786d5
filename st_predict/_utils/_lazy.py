"""Lazily imported attributes of a package (PEP 562), so that importing it stays cheap."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy_exports(package: str, names: Mapping[str, str], eager: dict | None = None) -> tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for ``package``: each of ``names`` (``{attribute: "module"}``, a module
    relative to ``package`` such as ``"._nh2st"``, or absolute) is imported on first access; ``eager`` are the
    attributes already defined."""
    eager = dict(eager or {})

    def __getattr__(name: str):
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(names[name], package), name)
        return value

    def __dir__():
        return sorted({*names, *eager})

    return __getattr__, __dir__
