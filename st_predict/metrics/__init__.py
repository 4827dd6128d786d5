"""Metrics for predicted spatial expression."""

from ._metrics import evaluate, pcc_per_gene

__all__ = ["evaluate", "pcc_per_gene"]
