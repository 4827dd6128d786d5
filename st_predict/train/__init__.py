"""Training machinery for NH2ST (pure torch + Lightning: no AnnData, no scvi-tools)."""

from ._data import NH2STCollate, NH2STDataModule
from ._embed import compute_fmaps
from ._trainingplan import NH2STTrainingPlan

__all__ = ["NH2STCollate", "NH2STDataModule", "NH2STTrainingPlan", "compute_fmaps"]
