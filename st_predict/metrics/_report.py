"""Per-section reports of predictions against measured expression (``st-predict evaluate``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from ._metrics import evaluate, pooled_pcc

_NOTE = (
    "pcc: per-gene PCC within each section, mean over genes (NaN genes are left out of the mean and counted in "
    "n_nan_genes). pcc_mean_over_sections covers only sections the model did not train on (trained_on: false); "
    "sections it trained on score optimistically and are reported apart. pcc_top50 and pcc_pooled_optimistic are "
    "optimistic variants, reported for comparison with papers."
)


def _nanmean(values) -> float | None:
    values = [v for v in values if v == v]
    return float(np.mean(values)) if values else None


def json_safe(obj):
    """``obj`` with NaN and inf as ``None`` and numpy scalars as Python ones: strict JSON, which every
    JSON reader parses (``json.dumps(..., allow_nan=False)``)."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float | np.floating) and not np.isfinite(obj):
        return None
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def evaluate_sections(
    pred: pd.DataFrame,
    truth: pd.DataFrame,
    sections: Sequence[str],
    training_sections: Sequence[str] | None = None,
) -> dict:
    """:func:`evaluate` within each section, with the headline kept honest.

    Parameters
    ----------
    pred, truth
        Spots x genes, on the same scale, rows aligned.
    sections
        Section of every spot.
    training_sections
        Sections the model trained on (``None``: not known). They are marked ``trained_on`` and
        left out of the headline ``pcc_mean_over_sections``; their mean is reported apart as
        ``pcc_mean_over_training_sections_optimistic``.

    Returns
    -------
    ``{"sections": [per-section rows], "training_sections", "pcc_mean_over_sections",
    "pcc_mean_over_training_sections_optimistic", "pcc_pooled_optimistic", "note"}``.
    """
    sections = np.asarray(sections).astype(str)
    rows, preds, truths = [], [], []
    trained_on = {str(s) for s in (training_sections or [])}
    for sec in pd.unique(sections):
        m = sections == sec
        p, t = pred.loc[m], truth.loc[m]
        rows.append({"section": str(sec), **evaluate(p, t), "trained_on": str(sec) in trained_on})
        preds.append(p)
        truths.append(t)
    held_out = [r["pcc"] for r in rows if not r["trained_on"]]
    seen = [r["pcc"] for r in rows if r["trained_on"]]
    result = {
        "sections": rows,
        "training_sections": sorted(trained_on) if training_sections is not None else None,
        # the headline: sections the model did not train on (a training section's score is optimistic)
        "pcc_mean_over_sections": _nanmean(held_out),
        "pcc_mean_over_training_sections_optimistic": _nanmean(seen),
        "pcc_pooled_optimistic": pooled_pcc(preds, truths),
        "note": _NOTE,
    }
    if training_sections is None:
        result["note"] += " The predictions do not say which sections the model trained on (written by an older st_predict)."
    return result


def sections_markdown(result: dict) -> str:
    """The table of :func:`evaluate_sections` as Markdown, with the headline line(s) under it."""
    rows = result["sections"]
    lines = ["| section | trained on | PCC | MSE | MAE | NaN genes | spots | top-50 PCC (optimistic) |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['section']} | {'yes' if r['trained_on'] else 'no'} | {r['pcc']:.3f} | {r['mse']:.4f} | "
              f"{r['mae']:.4f} | {r['n_nan_genes']} | {r['n_spots']} | {r['pcc_top50']:.3f} |" for r in rows]
    headline = result["pcc_mean_over_sections"]
    shown = "n/a (every section was a training section)" if headline is None else f"{headline:.3f}"
    lines += ["", f"Mean PCC over held-out sections: {shown}"]
    seen = [r for r in rows if r["trained_on"]]
    if seen:
        lines += [f"Mean PCC over the {len(seen)} training section(s), optimistic: "
                  f"{result['pcc_mean_over_training_sections_optimistic']:.3f}"]
    return "\n".join(lines) + "\n"
