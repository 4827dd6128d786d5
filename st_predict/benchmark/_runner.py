"""Leave-one-section-out benchmark: every method on the same folds, genes and trunk features."""

from __future__ import annotations

import json
import logging
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from st_predict._utils import (
    N_GENES,
    PATCH_SIZE_PX,
    SECTION_KEY,
    InputError,
    MissingKeyError,
    index_batches,
    run_batches,
    user_stacklevel,
)
from st_predict.data import select_sections
from st_predict.metrics import evaluate, pooled_pcc, spot_depth
from st_predict.model import DEFAULT
from st_predict.module import NetworkSettings
from st_predict.nn import build_encoder, canonical_name, prepare_patches, source_of
from st_predict.pp import (
    PatchGeometry,
    make_patch_reader,
    normalize_expression,
    section_pixel_sizes,
    select_genes,
    spot_libraries,
)

from ._egn import EGNStyle
from ._methods import (
    BLEEPRetrieval,
    Fold,
    HESTProbe,
    MeanBaseline,
    NH2STMethod,
    RidgeProbe,
    SmallCNN,
    STNetRegressor,
)
from ._reliability_metrics import reliability_metrics
from ._triplex import TRIPLEXStyle
from ._whole_section import His2STStyle, HisToGeneStyle

logger = logging.getLogger(__name__)


def _feature_baselines(seed: int) -> dict[str, Callable[[], object]]:
    """The baselines on the shared frozen features, first in every table."""
    return {
        "per-gene mean": MeanBaseline,
        "HEST probe (PCA-256 + ridge)": HESTProbe,
        "ridge (PCA-256)": RidgeProbe,
        "ST-Net-style (frozen trunk)": lambda: STNetRegressor(seed=seed),
        "BLEEP-style": lambda: BLEEPRetrieval(seed=seed),
    }


def default_methods(epochs: int | None = None, seed: int = 0, reliability: bool = False) -> dict[str, Callable[[], object]]:
    """The baselines, NH2ST (default recipe) and its ablations, as ``name -> factory``.

    ``epochs``: training epochs of the NH2ST rows (``None``: the recipe's); the baselines keep their own
    recipes (20 epochs). ``reliability``: the NH2ST rows train with ``reliability=True`` and get the reliability
    columns (coverage, width, the reliability's Spearman with the held-out PCC)."""
    extra = {"train_kwargs": {"reliability": True}} if reliability else {}
    nh = lambda **kw: (lambda: NH2STMethod(epochs=epochs, seed=seed, **extra, **kw))  # noqa: E731
    return {
        **_feature_baselines(seed),
        "small CNN (from scratch)": lambda: SmallCNN(seed=seed),
        # the paper's other comparisons, written after reading the authors' code (see _peer_common's CPU rule)
        "TRIPLEX-style": lambda: TRIPLEXStyle(seed=seed),
        "His2ST-style": lambda: His2STStyle(seed=seed),
        "HisToGene-style": lambda: HisToGeneStyle(seed=seed),
        "EGN-style": lambda: EGNStyle(seed=seed),
        "ST-Net-style end to end": nh(contrastive=False, use_neighbor_branch=False, translator_hidden=0, context="patch"),
        "NH2ST": nh(),
        "NH2ST residual cross-attention (authors' code)": nh(cross_residual=True),
        "NH2ST query branch only": nh(use_neighbor_branch=False),
        "NH2ST no contrastive loss": nh(contrastive=False),
        "NH2ST self-attention": nh(attention="self"),
        "NH2ST graph instead of hypergraph": nh(graph="graph"),
        "NH2ST tokens cross-attention": nh(attention_mode="tokens"),
        "NH2ST symmetric InfoNCE": nh(symmetric_nce=True),
        "NH2ST flatten pooling": nh(pooling="flatten"),
        "NH2ST K=4": nh(n_neighbors=4),
        "NH2ST K=16": nh(n_neighbors=16),
        "NH2ST L=1": nh(n_hgnn_layers=1),
        "NH2ST L=3": nh(n_hgnn_layers=3),
        "NH2ST frozen trunk": nh(trunk="frozen"),
    }


def frozen_methods(epochs: int | None = None, seed: int = 0, reliability: bool = False) -> dict[str, Callable[[], object]]:
    """The methods that read only the shared frozen encoder's features: the table for a pathology
    foundation model (``run_benchmark(encoder=...)``), where training an encoder end to end is out of
    reach on a CPU. NH2ST's heads train on the same features as the probes, on the same folds. ``reliability`` as
    in :func:`default_methods`."""
    extra = {"train_kwargs": {"reliability": True}} if reliability else {}
    nh = lambda **kw: (lambda: NH2STMethod(epochs=epochs, seed=seed, trunk="frozen", **extra, **kw))  # noqa: E731
    return {
        **_feature_baselines(seed),
        "NH2ST frozen trunk": nh(),
        "NH2ST frozen, query branch only": nh(use_neighbor_branch=False),
        "NH2ST frozen, no contrastive loss": nh(contrastive=False),
    }


def _encoder_fmaps(adata, setup, geometry: PatchGeometry, image_size, encoder, weights, feature_cache=None,
                   batch_size=16):
    """The frozen encoder's maps ``(n_obs, C, h, w)`` of every spot (a vector encoder: ``(n_obs, D, 1, 1)``),
    section by section from ``feature_cache`` when given."""
    from st_predict.dataloaders import FeatureCache, image_digest, maps_key, state_digest

    net, info = build_encoder(encoder, weights, image_size=image_size)
    net.eval()
    size = info.input_size or image_size
    libraries = spot_libraries(adata, setup["library_key"])
    reader = make_patch_reader(adata, setup["spatial_key"], setup["image_key"], setup["library_key"],
                               geometry.pixels_for(adata, libraries), size)

    def embed(idx: np.ndarray) -> torch.Tensor:
        fm = net(prepare_patches(reader.read(idx), info.mean, info.std))
        return fm[:, :, None, None] if fm.ndim == 2 else fm

    def compute(rows: np.ndarray) -> torch.Tensor:
        return run_batches(embed, index_batches(rows, batch_size), len(rows), net)

    if feature_cache is None or feature_cache is False:
        fmaps = compute(np.arange(adata.n_obs))
    else:
        cache = feature_cache if isinstance(feature_cache, FeatureCache) else FeatureCache(
            None if feature_cache is True else feature_cache)
        weights_id = state_digest(net)
        fmaps = None
        for lib in pd.unique(reader.libraries):
            rows = np.flatnonzero(reader.libraries == lib)
            key = maps_key(info, weights_id, size, views=1, pooled=False, section=str(lib),
                           image=image_digest(reader.images[lib]), boxes=reader.boxes[rows])
            fm = cache.get_or_compute(key, lambda rows=rows: compute(rows))
            if fmaps is None:
                fmaps = torch.empty((adata.n_obs, *fm.shape[1:]))
            fmaps[rows] = fm
    return fmaps, net, info, size


def run_benchmark(
    adata: AnnData,
    methods: Mapping[str, Callable[[], object]] | None = None,
    library_key: str = SECTION_KEY,
    group_key: str | None = None,
    folds: Sequence[str] | None = None,
    n_genes: int = N_GENES,
    image_key: str = "hires",
    spatial_key: str = "spatial",
    patch_size: float = PATCH_SIZE_PX,
    patch_size_um: float | None = None,
    image_size: int | None = None,
    weights: str | None = "imagenet",
    seed: int = 0,
    out_dir: str | Path | None = None,
    section_key: str | None = None,
    encoder: str = NetworkSettings().encoder,
    encoder_weights: str | None = None,
    feature_cache: str | Path | bool | None = None,
) -> dict:
    """Leave-one-section-out evaluation of several methods on one AnnData.

    For each held-out section (or, with ``group_key``, each held-out group of sections, e.g. a
    patient): genes are chosen on the training sections only
    (:func:`~st_predict.pp.select_genes`); every method is fitted on the training sections (any model
    selection happens inside them) and predicts the held-out one from its patches; per-gene PCC (mean
    over genes, NaN genes counted), MSE and MAE on ``log1p`` counts per 10k. All methods share one
    frozen ResNet18 trunk (``weights``) and its features, computed once.

    Next to the honest numbers each row carries the **optimistic** variants that papers report,
    labelled as such: ``pcc_top50`` (the 50 best genes of the held-out section, chosen after seeing
    the results) and, in the summary, ``pcc_pooled`` (PCC over the held-out spots of all folds
    concatenated, on the genes every fold predicts).

    Parameters
    ----------
    adata
        Raw counts, one library per section, images and coordinates as for
        :meth:`~st_predict.NH2ST.setup_anndata`.
    methods
        ``name -> factory`` of methods with ``fit(fold)`` / ``predict(fold)`` (default:
        :func:`default_methods`).
    library_key
        ``obs`` column of sections (libraries).
    group_key
        ``obs`` column to hold out by (e.g. patient); default: ``library_key``.
    folds
        Values of the hold-out column to run (default: all of them).
    n_genes
        Genes per fold, chosen on its training sections.
    image_key, spatial_key, patch_size, patch_size_um
        As in :meth:`~st_predict.NH2ST.setup_anndata`. The patch is resolved once, on all sections
        (:class:`~st_predict.pp.PatchGeometry`: micrometres where the pixel sizes are known), and every
        method of every fold crops that patch.
    image_size
        Side of the patches fed to the shared frozen ResNet18 (default: the ``"default"`` recipe's); any
        other encoder takes its own input size.
    weights
        ResNet18 weights (``"imagenet"``, a file, or ``"random"``).
    encoder, encoder_weights
        The shared frozen encoder, as :class:`~st_predict.NH2ST`'s ``encoder=`` / ``encoder_weights=``
        (e.g. ``"uni"`` or ``"hf-hub:MahmoodLab/UNI2-h"``). The frozen NH2ST rows use the same encoder and
        the same features. With any encoder but the ResNet18, use :func:`frozen_methods`.
    feature_cache
        Keep the encoder's features on disk (a folder, ``True``: the default one; see
        :class:`~st_predict.NH2ST.train`): a rerun, another method list or another fold split reads them.
    seed
        Seed of every method.
    out_dir
        Where to write ``results.json`` and ``results.md``.
    section_key
        Deprecated name of ``library_key``.

    Returns a dict with per-fold rows, a summary (mean ± std over folds) and run metadata; with
    ``out_dir`` also writes ``results.json`` and ``results.md``.
    """
    import scvi
    import sklearn

    import st_predict

    if section_key is not None:
        import warnings

        warnings.warn("run_benchmark(section_key=) is deprecated: use library_key=.", FutureWarning, stacklevel=user_stacklevel())
        library_key = section_key
    section_key = library_key
    image_size = DEFAULT.network.image_size if image_size is None else image_size
    t_start = time.perf_counter()
    methods = dict(methods) if methods is not None else default_methods(seed=seed)
    for key in {section_key, group_key or section_key}:
        if key not in adata.obs:
            raise MissingKeyError(f"adata.obs[{key!r}] is missing (the column of sections / hold-out groups).")
    group_key = group_key or section_key
    groups_all = adata.obs[group_key].astype(str).to_numpy()
    sections_all = adata.obs[section_key].astype(str).to_numpy()
    groups = [str(g) for g in pd.unique(groups_all)]
    if len(groups) < 2:
        raise InputError(f"adata.obs[{group_key!r}] has {len(groups)} value(s); hold-out needs at least 2.")
    per_section = pd.crosstab(sections_all, groups_all).gt(0).sum(axis=1)
    if (per_section > 1).any():
        raise InputError(
            f"Sections {list(per_section.index[per_section > 1])} span several values of adata.obs[{group_key!r}]; "
            "each section must belong to one hold-out group."
        )
    folds = list(folds) if folds is not None else groups
    unknown = [f for f in folds if f not in groups]
    if unknown:
        raise InputError(f"Folds {unknown} are not values of adata.obs[{group_key!r}] ({groups}).")
    # the patch, resolved once on every section: every method of every fold crops the same tissue area
    geometry = PatchGeometry.resolve(adata, sections_all, patch_size, patch_size_um)
    patch = geometry.setup_kwargs(section_pixel_sizes(adata, sections_all))
    setup = {"library_key": section_key, "image_key": image_key, "spatial_key": spatial_key, **patch}
    torch.manual_seed(seed)
    t = time.perf_counter()
    # weights= are the weights of an encoder trained by default (the ResNet18's); any other takes encoder_weights=
    chosen = encoder_weights if encoder_weights is not None or not source_of(canonical_name(encoder)).trainable \
        else weights
    # the shared encoder, built once: every method of every fold reads its features, and a frozen NH2ST row gets the
    # module itself (not a rebuild per fold and method)
    fmaps, trunk, info, image_size = _encoder_fmaps(adata, setup, geometry, image_size, encoder, chosen, feature_cache)
    weights_source = info.weights
    seconds_features = time.perf_counter() - t
    pooled = fmaps.mean((2, 3)).numpy()
    spot_libraries(adata, section_key)  # checks the section column
    rows, held_out = [], {name: ([], []) for name in methods}
    for test_group in folds:
        train_mask = groups_all != test_group
        train_sections = [str(s) for s in pd.unique(sections_all[train_mask])]
        test_sections = [str(s) for s in pd.unique(sections_all[~train_mask])]
        train = select_sections(adata, train_sections, section_key)
        test = select_sections(adata, test_sections, section_key)
        genes = select_genes(train.X, train.var_names, train.obs[section_key].astype(str).to_numpy(), n_top=n_genes)
        gidx_tr, gidx_te = train.var_names.get_indexer(genes), test.var_names.get_indexer(genes)
        fold = Fold(
            test_section=test_group, train=train, test=test, genes=genes,
            y_train=normalize_expression(train.X, gidx_tr), groups=train.obs[section_key].astype(str).to_numpy(),
            feats_train=pooled[train_mask], feats_test=pooled[~train_mask],
            extra={"setup": setup, "geometry": geometry, "image_size": image_size, "trunk": trunk, "encoder_spec": info,
                   "encoder": info.name, "encoder_weights": chosen,
                   "fmaps_train": fmaps[torch.from_numpy(train_mask)],
                   "fmaps_test": fmaps[torch.from_numpy(~train_mask)], "weights_source": weights_source},
        )
        y_test = normalize_expression(test.X, gidx_te)
        for name, factory in methods.items():
            t, cpu = time.perf_counter(), time.process_time()
            method = factory()
            method.fit(fold)
            pred = np.asarray(method.predict(fold))
            m = evaluate(pred, y_test)
            rows.append({"method": name, "held_out": test_group, **m, "seconds": round(time.perf_counter() - t, 2),
                         "cpu_seconds": round(time.process_time() - cpu, 2),
                         "sees_context": bool(getattr(method, "sees_context", False))})
            if getattr(method, "inner_", None) is not None:  # scored on splits of the training sections only
                rows[-1]["inner"] = method.inner_
            unc = method.uncertainty(fold) if hasattr(method, "uncertainty") else None
            if unc is not None:  # reliability and intervals, calibrated on the training sections only
                # at the held-out section's own depth: each spot's UMI count
                rows[-1].update(reliability_metrics(unc["model"], pred, unc["folds"], np.asarray(y_test),
                                                    depth=spot_depth(test)))
            if hasattr(method, "reliability_metrics"):  # a method with its own calibration (a pretrained predictor's)
                rows[-1].update(method.reliability_metrics(fold, pred, np.asarray(y_test)) or {})
            if getattr(method, "missing_genes_", None) is not None:  # genes it cannot output: counted, not dropped
                rows[-1]["n_genes_not_output"] = len(method.missing_genes_)
            if getattr(method, "selected_", None) is not None:  # a setting chosen inside the training sections
                rows[-1]["selected"] = method.selected_
            held_out[name][0].append(pd.DataFrame(pred, columns=genes))
            held_out[name][1].append(pd.DataFrame(np.asarray(y_test), columns=genes))
            logger.info("%s on %s: PCC %.3f MSE %.4f (%.1f s)", name, test_group, m["pcc"], m["mse"], rows[-1]["seconds"])
    df = pd.DataFrame(rows)
    summary = (
        df.groupby("method", sort=False)
        .agg(pcc_mean=("pcc", "mean"), pcc_std=("pcc", lambda x: x.std(ddof=0)), mse=("mse", "mean"),
             mae=("mae", "mean"), n_nan_genes=("n_nan_genes", "sum"), seconds=("seconds", "sum"),
             cpu_seconds=("cpu_seconds", "sum"), sees_context=("sees_context", "max"),
             pcc_top50=("pcc_top50", "mean"))
        .reset_index()
    )
    summary["pcc_pooled"] = [pooled_pcc(*held_out[name]) for name in summary["method"]]
    extra = [c for c in df.columns if c.startswith(("coverage_", "width_", "spearman_", "crps_", "pcc_ensemble",
                                                    "pcc_single", "n_reliable_genes", "n_genes_not_output"))]
    if extra:  # methods with intervals: their reliability columns, mean over folds
        summary = summary.merge(df.groupby("method", sort=False)[extra].mean().reset_index(), on="method", how="left")
    result = {
        "protocol": "leave-one-section-out; genes (top-n by mean log1p CP10k, detected in every training section) "
        "and any model selection from the training sections only; per-gene PCC within the held-out section, "
        "mean over genes (NaN genes excluded from the mean and counted); MSE/MAE over spots x genes",
        "optimistic_metrics": "Optimistic variants, labelled. pcc_top50: mean PCC of the 50 best genes of the held-out section (chosen after "
        "seeing the results); pcc_pooled: per-gene PCC over the held-out spots of all folds concatenated, on the "
        "genes every fold predicts. Both inflate performance; reported only for comparison with papers.",
        "hold_out_key": group_key, "folds": folds, "n_genes": n_genes, "seed": seed, "weights": weights_source,
        "encoder": info.name,
        "patch": str(geometry), "image_size": image_size,
        "machine": f"{platform.machine()} {platform.processor()}, {torch.get_num_threads()} torch threads",
        "versions": {"st_predict": st_predict.__version__, "torch": torch.__version__, "scvi-tools": scvi.__version__,
                     "scikit-learn": sklearn.__version__},
        "seconds_features": round(seconds_features, 1),
        "seconds_total": round(time.perf_counter() - t_start, 1),
        "rows": rows,
        "summary": summary.to_dict(orient="records"),
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(result, indent=2))
        (out / "results.md").write_text(to_markdown(result))
    return result


def _cell(value, fmt: str) -> str:
    return "—" if value is None or (isinstance(value, float) and not np.isfinite(value)) else format(value, fmt)


def to_markdown(result: dict) -> str:
    """The summary table of :func:`run_benchmark` as Markdown (with the per-fold choices of any
    :func:`~st_predict.benchmark.nested_selection` added to it)."""
    lines = [f"**{result['title']}**", ""] if result.get("title") else []
    lines += [
        f"Leave-one-section-out over {len(result['folds'])} sections ({', '.join(result['folds'])}), "
        f"{result['n_genes']} genes, encoder {result.get('encoder', 'resnet18')}, weights: {result['weights']}.",
        "",
        "| method | sees beyond its patch at inference | PCC (mean ± std over folds) | MSE | MAE | NaN genes | "
        "CPU seconds | seconds | top-50 PCC (optimistic) | pooled PCC (optimistic) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["summary"]:
        sees = {True: "yes", False: "no"}.get(r.get("sees_context"), "—")
        lines.append(
            f"| {r['method']} | {sees} | {r['pcc_mean']:.3f} ± {r['pcc_std']:.3f} | {r['mse']:.4f} | {r['mae']:.4f} | "
            f"{r['n_nan_genes']} | {_cell(r.get('cpu_seconds'), '.1f')} | {r['seconds']:.1f} | "
            f"{_cell(r.get('pcc_top50'), '.3f')} | {_cell(r.get('pcc_pooled'), '.3f')} |"
        )
    lines += [
        "",
        "PCC: per-gene Pearson correlation within the held-out section, mean over genes, then mean ± std over "
        "folds (the honest number). The two optimistic columns are what papers often report instead: the 50 best "
        "genes chosen after seeing the results, and PCC over all held-out spots pooled across sections. CPU "
        "seconds: the process's CPU time for the method over all folds (fit and predict); seconds: wall time.",
    ]
    lines += _reliability_markdown(result["summary"])
    for name, nested in (result.get("nested") or {}).items():
        cands = nested["candidates"]
        lines += ["", f"Nested selection **{name}** ({nested['rule']}):", "",
                  "| held-out section | " + " | ".join(f"inner PCC: {c}" for c in cands) + " | chosen | its PCC |",
                  "|---|" + "---|" * (len(cands) + 2)]
        for fold in result["folds"]:
            if fold not in nested["choices"]:
                continue
            means = nested["inner_means"][fold]
            lines.append(f"| {fold} | " + " | ".join(f"{means[c]:.3f}" for c in cands)
                         + f" | {nested['choices'][fold]} | {nested['pcc'][fold]:.3f} |")
        lines += ["", f"Chosen on most folds (the default it gives): {nested['default']}."]
    return "\n".join(lines) + "\n"


#: the reliability columns of the Markdown table: (summary key, header, format)
_RELIABILITY_COLUMNS = (("coverage_80", "80 % coverage", ".3f"), ("coverage_90", "90 % coverage", ".3f"),
                        ("width_90", "90 % width", ".3f"), ("spearman_reliability", "Spearman(reliability, PCC)", ".3f"),
                        ("n_reliable_genes", "reliable genes", ".1f"), ("n_genes_not_output", "genes not output", ".1f"))


def _reliability_markdown(summary) -> list[str]:
    """A second table for the methods with intervals (NH2ST with ``reliability=True``, calibrated pretrained
    predictors) and the genes a method cannot output."""
    keys = [k for k, _, _ in _RELIABILITY_COLUMNS]
    rows = [r for r in summary if any(_finite(r.get(k)) for k in keys)]
    if not rows:
        return []
    lines = ["", "| method | " + " | ".join(h for _, h, _ in _RELIABILITY_COLUMNS) + " |",
             "|---|" + "---|" * len(_RELIABILITY_COLUMNS)]
    for r in rows:
        lines.append(f"| {r['method']} | " + " | ".join(_cell(r.get(k), f) for k, _, f in _RELIABILITY_COLUMNS) + " |")
    lines += ["", "Reliability, from the training sections only, scored on the held-out one: per-gene coverage of the "
              "80 % and 90 % intervals (mean over genes, then folds), the mean 90 % width on the log1p scale, the "
              "Spearman correlation across genes of each gene's reliability with the PCC it then achieves, the genes "
              "called reliable, and the fold's genes the method cannot output (predicted by their training mean: "
              "NaN PCC, counted)."]
    return lines


def _finite(value) -> bool:
    return isinstance(value, int | float) and bool(np.isfinite(value))
