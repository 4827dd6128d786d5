"""Plotting."""

from ._metrics_plots import pcc_distribution, training_curves
from ._reliability_plots import gene_reliability, interval_map, reliability_vs_achieved
from ._spatial import predicted_vs_measured, predictions_to_anndata

__all__ = [
    "gene_reliability",
    "interval_map",
    "pcc_distribution",
    "predicted_vs_measured",
    "predictions_to_anndata",
    "reliability_vs_achieved",
    "training_curves",
]
