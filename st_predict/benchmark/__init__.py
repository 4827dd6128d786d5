"""Honest leave-one-section-out benchmarking of NH2ST next to baselines."""

from ._methods import (
    BLEEPRetrieval,
    Fold,
    HESTProbe,
    MeanBaseline,
    NH2STMethod,
    RidgeProbe,
    SmallCNN,
    STNetRegressor,
)
from ._runner import default_methods, frozen_methods, run_benchmark, to_markdown

__all__ = [
    "BLEEPRetrieval",
    "Fold",
    "HESTProbe",
    "MeanBaseline",
    "NH2STMethod",
    "RidgeProbe",
    "STNetRegressor",
    "SmallCNN",
    "default_methods",
    "frozen_methods",
    "run_benchmark",
    "to_markdown",
]
