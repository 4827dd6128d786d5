"""Honest leave-one-section-out benchmarking of NH2ST next to baselines."""

from ._egn import EGNStyle
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
from ._nested import nested_selection
from ._pretrained import PretrainedMethod, pretrained_methods
from ._reliability_metrics import crps_gaussian, reliability_metrics
from ._runner import default_methods, frozen_methods, run_benchmark, to_markdown
from ._triplex import TRIPLEXStyle
from ._whole_section import His2STStyle, HisToGeneStyle

__all__ = [
    "BLEEPRetrieval",
    "EGNStyle",
    "Fold",
    "HESTProbe",
    "His2STStyle",
    "HisToGeneStyle",
    "MeanBaseline",
    "NH2STMethod",
    "PretrainedMethod",
    "RidgeProbe",
    "STNetRegressor",
    "SmallCNN",
    "TRIPLEXStyle",
    "crps_gaussian",
    "default_methods",
    "frozen_methods",
    "nested_selection",
    "pretrained_methods",
    "reliability_metrics",
    "run_benchmark",
    "to_markdown",
]
