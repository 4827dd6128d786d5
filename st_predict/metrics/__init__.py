"""Metrics for predicted spatial expression."""

from ._metrics import evaluate, measured_expression, pcc_per_gene, pooled_pcc, top_k_pcc
from ._report import evaluate_sections, json_safe, sections_markdown

__all__ = [
    "evaluate",
    "evaluate_sections",
    "json_safe",
    "measured_expression",
    "pcc_per_gene",
    "pooled_pcc",
    "sections_markdown",
    "top_k_pcc",
]
