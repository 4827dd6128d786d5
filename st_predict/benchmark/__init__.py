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
from ._reliability_metrics import crps_gaussian, reliability_metrics
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
    "crps_gaussian",
    "default_methods",
    "frozen_methods",
    "reliability_metrics",
    "run_benchmark",
    "to_markdown",
]
