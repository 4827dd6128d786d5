"""Metrics for predicted spatial expression."""

from ._intervals import crps_gaussian, interval_scores, intervals_at_depth, marginal_width, spot_depth
from ._metrics import evaluate, measured_expression, pcc_per_gene, pooled_pcc, top_k_pcc
from ._report import evaluate_sections, json_safe, sections_markdown

__all__ = [
    "crps_gaussian",
    "evaluate",
    "evaluate_sections",
    "interval_scores",
    "intervals_at_depth",
    "json_safe",
    "marginal_width",
    "measured_expression",
    "pcc_per_gene",
    "pooled_pcc",
    "sections_markdown",
    "spot_depth",
    "top_k_pcc",
]
