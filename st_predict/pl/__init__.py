"""Plotting."""

from ._spatial import predicted_vs_measured, predictions_to_anndata

__all__ = ["predicted_vs_measured", "predictions_to_anndata"]
