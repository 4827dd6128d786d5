"""Plotting."""

from ._metrics_plots import pcc_distribution, training_curves
from ._spatial import predicted_vs_measured, predictions_to_anndata

__all__ = ["pcc_distribution", "predicted_vs_measured", "predictions_to_anndata", "training_curves"]
