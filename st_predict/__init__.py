"""st_predict: spatially resolved gene expression from H&E slides, on AnnData / SpatialData."""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("st-predict")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+unknown"

from st_predict._utils import InputError, InputWarning

# Heavy parts (scvi-tools, scanpy, squidpy) load on first use, so that ``st_predict.module`` and
# ``st_predict.train`` import with torch + Lightning alone (e.g. on a bare GPU image).
_LAZY = {"NH2ST": ("st_predict.model", "NH2ST"), "Pretrained": ("st_predict.model", "Pretrained")}
_SUBMODULES = ("benchmark", "cli", "data", "dataloaders", "metrics", "model", "module", "nn", "pl", "pp", "tl", "train")

__all__ = ["NH2ST", "InputError", "Pretrained", "InputWarning", "benchmark", "cli", "data", "dataloaders", "metrics", "model", "module",
           "nn", "pl", "pp", "tl", "train", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    if name in _SUBMODULES:
        return importlib.import_module(f"st_predict.{name}")
    raise AttributeError(f"module 'st_predict' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
