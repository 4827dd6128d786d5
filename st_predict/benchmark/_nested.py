"""A fully nested choice between candidate configurations, from their scores on the inner splits."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from st_predict._utils import InputError

#: the rule :func:`nested_selection` applies, as the table states it
RULE = ("for each held-out section, the candidate with the highest mean PCC over the leave-one-section-out splits "
        "of that fold's training sections; a tie (to 3 decimals) goes to the first candidate listed")


def nested_selection(result: dict, candidates: Sequence[str], name: str) -> dict:
    """Add to a :func:`~st_predict.benchmark.run_benchmark` result the row ``name``: on each fold, the
    candidate whose inner score (its ``inner_`` from ``NH2STMethod(inner_loso=True)``: the mean PCC over the
    leave-one-section-out splits of that fold's training sections) is highest, with that candidate's scores
    on the held-out section. Nothing about a held-out section enters its own choice.

    The candidates and the rule (:data:`RULE`) are fixed before running. Also records, in
    ``result["nested"][name]``, each fold's inner means and choice, and ``default``: the candidate chosen on
    most folds (a tie goes to the first listed), the setting a package default should take. The row's
    seconds are the sum over the candidates (the selection ran them all); its pooled PCC is not defined (the
    rows keep no predictions). Returns ``result``, changed in place."""
    candidates = list(candidates)
    if len(candidates) < 2:
        raise InputError(f"A selection needs at least two candidates, got {candidates}.")
    rows = {(r["method"], r["held_out"]): r for r in result["rows"]}
    known = {r["method"] for r in result["rows"]}
    missing = [c for c in candidates if c not in known]
    if missing:
        raise InputError(f"Candidates {missing} are not methods of this result ({sorted(known)}).")
    choices, inner_means, pcc, new_rows = {}, {}, {}, []
    for fold in result["folds"]:
        have = [rows.get((c, fold)) for c in candidates]
        if any(r is None for r in have):
            continue
        if any("inner" not in r for r in have):
            raise InputError(f"Fold {fold!r}: every candidate needs its inner scores (NH2STMethod(inner_loso=True)).")
        means = {c: float(r["inner"]["mean"]) for c, r in zip(candidates, have, strict=True)}
        best = max(candidates, key=lambda c: (round(np.nan_to_num(means[c], nan=-np.inf), 3), -candidates.index(c)))
        chosen = rows[(best, fold)]
        row = {k: v for k, v in chosen.items() if k != "inner"}
        row.update(method=name, chosen=best, inner_means=means,
                   seconds=round(sum(r["seconds"] for r in have), 2),
                   cpu_seconds=round(sum(r.get("cpu_seconds", np.nan) for r in have), 2))
        new_rows.append(row)
        choices[fold], inner_means[fold], pcc[fold] = best, means, float(chosen["pcc"])
    if not new_rows:
        raise InputError("No fold has every candidate's row.")
    result["rows"] = [r for r in result["rows"] if r["method"] != name] + new_rows
    vals = np.array([r["pcc"] for r in new_rows], dtype=float)
    summary = {
        "method": name, "pcc_mean": float(np.nanmean(vals)), "pcc_std": float(np.nanstd(vals)),
        "mse": float(np.mean([r["mse"] for r in new_rows])), "mae": float(np.mean([r["mae"] for r in new_rows])),
        "n_nan_genes": int(sum(r["n_nan_genes"] for r in new_rows)),
        "seconds": float(sum(r["seconds"] for r in new_rows)),
        "cpu_seconds": float(sum(r["cpu_seconds"] for r in new_rows)),
        "sees_context": bool(any(r.get("sees_context") for r in new_rows)),
        "pcc_top50": float(np.mean([r["pcc_top50"] for r in new_rows])), "pcc_pooled": float("nan"),
    }
    result["summary"] = [r for r in result["summary"] if r["method"] != name] + [summary]
    counts = Counter(choices.values())
    default = max(candidates, key=lambda c: (counts.get(c, 0), -candidates.index(c)))
    result.setdefault("nested", {})[name] = {
        "candidates": candidates, "rule": RULE, "choices": choices, "inner_means": inner_means, "pcc": pcc,
        "default": default,
    }
    return result
