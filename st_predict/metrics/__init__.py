"""Metrics for predicted spatial expression."""

from ._metrics import evaluate, pcc_per_gene, pooled_pcc, top_k_pcc

__all__ = ["evaluate", "pcc_per_gene", "pooled_pcc", "top_k_pcc"]
