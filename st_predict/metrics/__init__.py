"""Metrics for predicted spatial expression."""

from ._metrics import evaluate, measured_expression, pcc_per_gene, pooled_pcc, top_k_pcc

__all__ = ["evaluate", "measured_expression", "pcc_per_gene", "pooled_pcc", "top_k_pcc"]
