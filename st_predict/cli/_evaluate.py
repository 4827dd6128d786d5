"""``st-predict evaluate``: metrics of predictions against the measured expression, and the coverage of the
prediction intervals when the model wrote them."""

from __future__ import annotations

import json
from pathlib import Path

from st_predict._utils import PREDICTED_KEY, InputError, MissingFileError, staged_folder
from st_predict.cli._options import add_library_key


def _output_folder(out: Path, overwrite: bool, produces: tuple[str, ...]) -> None:
    """Refuse an output folder that holds an earlier run's files (``produces``: their names or globs)
    unless ``--overwrite``."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a folder")
    old = sorted({p.name for pattern in produces for p in out.glob(pattern)}) if out.is_dir() else []
    if old and not overwrite:
        raise InputError(f"{out} already holds {', '.join(old[:3])}{' ...' if len(old) > 3 else ''}; pass --overwrite")


def _cmd_evaluate(args) -> int:
    import pandas as pd

    from st_predict.data import read_h5ad
    from st_predict.metrics import evaluate_sections, json_safe, measured_expression, sections_markdown

    path = Path(args.predictions)
    if not path.is_file():
        raise MissingFileError(f"{args.predictions!r} is not a file (expected the .h5ad written by st-predict predict)")
    out = Path(args.out)
    _output_folder(out, args.overwrite, ("metrics.json", "metrics.md", "pcc_distribution_*.png"))
    adata = read_h5ad(path)
    if args.key not in adata.obsm:
        raise InputError(f"adata.obsm has no predictions {args.key!r} (keys: {list(adata.obsm)})")
    pred = adata.obsm[args.key]
    if not isinstance(pred, pd.DataFrame):
        raise InputError(f"adata.obsm[{args.key!r}] is not a DataFrame of predicted genes")
    truth = measured_expression(adata, list(pred.columns), args.layer, is_count_data=not args.normalized)
    if args.library_key in adata.obs:
        sections = adata.obs[args.library_key].astype(str).to_numpy()
    else:
        sections = ["all"] * adata.n_obs
    meta = adata.uns.get("st_predict", {})
    training = meta.get(args.key, {}).get("training_sections") if isinstance(meta, dict) else None
    result = evaluate_sections(pred, truth, sections, None if training is None else [str(t) for t in training])
    result = {"predictions": str(path), "key": args.key, **result}
    coverage = _interval_coverage(adata, args.key, truth, sections, training, not args.normalized, args.layer)
    if coverage is not None:
        result["intervals"] = coverage
    table = sections_markdown(result)
    with staged_folder(out) as staging:
        _pcc_figures(pred, truth, sections, staging)
        (staging / "metrics.json").write_text(json.dumps(json_safe(result), indent=2, allow_nan=False))
        (staging / "metrics.md").write_text(table)
    if training is None:
        print(f"No training sections recorded in adata.uns['st_predict'][{args.key!r}]: every section is scored as "
              "held out.")
    else:
        print(f"Training sections of the model (adata.uns['st_predict'][{args.key!r}]): "
              f"{', '.join(map(str, training)) or 'none'}")
    print(table, end="")
    if coverage is not None:
        level = coverage["level"]
        print(f"{level:.0%} intervals for a measurement at {coverage['depth']} hold "
              f"{coverage['coverage_held_out']:.1%} of the measured values of held-out sections (per gene, mean over "
              f"genes; nominal {level:.0%}); mean width {coverage['mean_width']:.3f}, "
              f"{coverage.get('width_ratio_marginal', float('nan')):.2f}x each gene's marginal interval of the same "
              "coverage (below 1: sharper than knowing nothing of the spot)")
    print(f"Wrote {out / 'metrics.json'}, {out / 'metrics.md'} and {len(result['sections'])} PCC distribution figure(s)")
    return 0


def _pcc_figures(pred, truth, sections, folder: Path) -> None:
    import matplotlib.pyplot as plt
    import numpy as np
    import pandas as pd

    from st_predict.pl import pcc_distribution

    sections = np.asarray(sections)
    for sec in pd.unique(sections):
        m = sections == sec
        ax = pcc_distribution(pred.loc[m], truth.loc[m], title=f"Per-gene PCC, section {sec}")
        ax.figure.savefig(folder / f"pcc_distribution_{sec}.png", dpi=110, bbox_inches="tight")
        plt.close(ax.figure)


def _interval_coverage(adata, key: str, truth, sections, training, counts: bool, layer=None) -> dict | None:
    """Per section and over the held-out sections: the fraction of measured values inside the intervals (per
    gene, mean over genes), the mean width and the sharpness (:func:`~st_predict.metrics.interval_scores`). With
    counts and a model that wrote its counts model, the interval for a measurement is rebuilt at each spot's own
    depth (:func:`~st_predict.metrics.intervals_at_depth`); otherwise ``obsm[key_lower]``..``obsm[key_upper]``
    as written, at the depth ``predict`` was asked for."""
    import numpy as np

    from st_predict.metrics import interval_scores, intervals_at_depth

    lo, hi = adata.obsm.get(f"{key}_lower"), adata.obsm.get(f"{key}_upper")
    if lo is None or hi is None:
        return None
    meta = adata.uns.get("st_predict", {}).get(key, {}) if isinstance(adata.uns.get("st_predict"), dict) else {}
    level = float(meta.get("interval_level", float("nan")))
    cols = list(truth.columns)
    own = counts and f"{key}_model_sd" in adata.obsm and str(meta.get("counts_model", "none")) != "none" \
        and "interval_quantiles" in meta
    if own:
        lo, hi = intervals_at_depth(adata, key, layer=layer)
    y, lo, hi = truth.to_numpy(), lo[cols].to_numpy(), hi[cols].to_numpy()
    inside = (y >= lo) & (y <= hi)
    sections = np.asarray(sections).astype(str)
    trained = set() if training is None else {str(t) for t in training}
    per = {str(s): float(inside[sections == s].mean(0).mean()) for s in dict.fromkeys(sections)}
    held = ~np.isin(sections, list(trained)) if trained else np.ones(len(sections), bool)
    depth = meta.get("interval_depth", float("nan"))
    out = {"level": level, "depth": "each spot's own UMI count" if own else
           (f"{depth:.0f} UMI per spot" if isinstance(depth, float) and depth > 0 else "as predicted"),
           "coverage_held_out": float("nan"), "coverage_by_section": per, "mean_width": float("nan")}
    if held.any():
        point = adata.obsm[key][cols].to_numpy()[held]
        scores = interval_scores(lo[held], hi[held], y[held], point, level if 0 < level < 1 else None)
        out.update(coverage_held_out=scores["coverage"], mean_width=scores["width"],
                   width_ratio_marginal=scores["width_ratio_marginal"],
                   **{k: scores[k] for k in ("crps", "crps_one_width_per_gene") if k in scores})
    return out


def reliability_lines(model, key: str, level: float, n_show: int = 5) -> str:
    """What ``st-predict predict`` says of a model trained with ``--reliability``: the interval keys and the
    genes ranked by reliability, the unreliable ones counted and named first."""
    rel = model.gene_reliability_.sort_values("reliability", ascending=False)
    bad = rel.index[~rel["reliable"].to_numpy()]

    def show(genes):
        return ", ".join(f"{g} {rel.loc[g, 'reliability']:.2f}" for g in genes[:n_show]) + (" ..." if len(genes) > n_show else "")

    lines = [f"{level:.0%} intervals in obsm[{key + '_lower'!r}] and obsm[{key + '_upper'!r}]; per-gene reliability "
             f"(out-of-fold PCC on {len(model.reliability_sections_)} held-out training sections) in "
             f"uns['st_predict'][{key!r}]['gene_reliability'].",
             f"  most reliable: {show(list(rel.index))}"]
    if len(bad):
        lines.append(f"  {len(bad)} of {len(rel)} genes unreliable (their reliability's 95 % interval reaches 0 or "
                     f"below; do not read their maps): {show(list(bad[::-1]))}")
    else:
        lines.append(f"  all {len(rel)} genes reliable (95 % interval above 0)")
    return "\n".join(lines)


def add_parsers(sub, fmt, debug) -> None:
    """Add 'evaluate' to the subcommands ``sub``."""
    p = sub.add_parser("evaluate", formatter_class=fmt, parents=[debug], help="metrics of predictions against measured expression",
                       description="Per section: per-gene PCC (mean over genes, NaN genes counted), MSE, MAE on the "
                       "predictions' scale, plus the labelled optimistic variants (top-50 genes, pooled). Writes "
                       "metrics.json, metrics.md and pcc_distribution_<section>.png.")
    p.add_argument("predictions", help=".h5ad written by st-predict predict, with measured counts in X (or --layer)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--key", default=PREDICTED_KEY, help="obsm key of the predictions")
    add_library_key(p, "obs column of sections (absent: one section)")
    p.add_argument("--layer", default=None, help="measured expression layer (default: X)")
    p.add_argument("--normalized", action="store_true", help="the measured expression is already log-normalised")
    p.add_argument("--overwrite", action="store_true", help="replace the files of an earlier run in the output folder")
    p.set_defaults(func=_cmd_evaluate)
