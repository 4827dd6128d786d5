"""Plots of evaluation metrics and training history: per-gene PCC distribution, loss curves."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd

from st_predict._utils import PREDICTED_KEY, InputError, InputTypeError, MissingKeyError
from st_predict.metrics import pcc_per_gene

_PREFIXES = ("train", "validation")


def _missing(names: Sequence, n_max: int = 10) -> str:
    names = [str(n) for n in names]
    more = f" (+{len(names) - n_max} more)" if len(names) > n_max else ""
    return f"{names[:n_max]}{more}"


def _align(pred: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    """``truth`` reordered to ``pred``'s spots and genes; raises naming what does not match."""
    for name, df in (("pred", pred), ("truth", truth)):
        if not isinstance(df, pd.DataFrame):
            raise InputTypeError(f"{name} must be a spots x genes DataFrame, got {type(df).__name__}.")
        for axis, labels in (("genes (columns)", df.columns), ("spots (index)", df.index)):
            if labels.has_duplicates:
                raise InputError(f"{name} has duplicated {axis}: {_missing(labels[labels.duplicated()].unique())}")
    problems = []
    for axis, p, t in (("genes", pred.columns, truth.columns), ("spots", pred.index, truth.index)):
        only_pred, only_truth = p.difference(t, sort=False), t.difference(p, sort=False)
        if len(only_pred):
            problems.append(f"{len(only_pred)} {axis} of pred missing from truth: {_missing(only_pred)}")
        if len(only_truth):
            problems.append(f"{len(only_truth)} {axis} of truth missing from pred: {_missing(only_truth)}")
    if problems:
        raise MissingKeyError("pred and truth do not align: " + "; ".join(problems))
    return truth.loc[pred.index, pred.columns]


def _new_ax(ax, figsize):
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=figsize)
    return ax


def pcc_distribution(
    pred: pd.DataFrame | ad.AnnData,
    truth: pd.DataFrame,
    n_label: int = 5,
    key: str = PREDICTED_KEY,
    bins: int | Sequence[float] = 30,
    ax=None,
    title: str | None = None,
    save: str | None = None,
    return_labels: bool = False,
    **kwargs,
):
    """Histogram of the per-gene Pearson correlation between predicted and measured expression.

    The PCC of each gene across spots comes from :func:`st_predict.metrics.pcc_per_gene`. The mean
    and median (over genes with a defined PCC) are drawn as vertical lines, the ``n_label`` best and
    worst genes are listed in the corners with their PCC and marked under the histogram. Genes whose
    PCC is undefined (NaN: constant in the predictions or the measurements of this section, or with
    non-finite values) cannot be binned; they are counted in the default title and in the legend.

    Parameters
    ----------
    pred
        Predicted expression, spots x genes, or an AnnData whose ``obsm[key]`` holds it (as written
        by ``model.predict``).
    truth
        Measured expression, spots x genes, on the same scale. Its rows and columns are matched to
        ``pred`` by name (order does not matter); both must hold exactly the same spots and genes.
    n_label
        How many best and worst genes to name. When there are fewer than ``2 * n_label`` genes with
        a defined PCC, the worst list only holds genes not already in the best list.
    key
        ``obsm`` key of the predictions when ``pred`` is an AnnData.
    bins
        Passed to :meth:`matplotlib.axes.Axes.hist`.
    ax
        Axes to draw into; a new figure when ``None``.
    title
        Axes title. Default: ``"Per-gene PCC (<n> genes, <k> NaN)"``.
    save
        Path to save the figure to.
    return_labels
        Also return the named genes and the per-gene PCC (see Returns).
    **kwargs
        More keyword arguments for :meth:`matplotlib.axes.Axes.hist`.

    Returns
    -------
    The :class:`~matplotlib.axes.Axes`. With ``return_labels=True``, a tuple ``(ax, labels)`` where
    ``labels`` is a dict with ``"best"`` (the ``n_label`` genes of highest PCC, best first),
    ``"worst"`` (lowest PCC, worst first), ``"nan"`` (genes with undefined PCC) and ``"pcc"`` (a
    :class:`pandas.Series` of the PCC of every gene, NaN included, in ``pred``'s gene order).

    Raises
    ------
    KeyError
        If ``pred`` and ``truth`` do not hold the same genes and spots (the message names the
        missing ones), or ``obsm[key]`` is missing.
    ValueError
        If no gene has a defined PCC.
    """
    from matplotlib.patches import Patch

    if isinstance(pred, ad.AnnData):
        if key not in pred.obsm:
            raise MissingKeyError(f"adata.obsm[{key!r}] is missing: run model.predict(adata, key_added={key!r}) first.")
        pred = pred.obsm[key]
    if int(n_label) != n_label or n_label < 0:
        raise InputError(f"n_label must be a non-negative integer, got {n_label!r}.")
    truth = _align(pred, truth)
    genes = pred.columns
    r = pd.Series(pcc_per_gene(pred, truth), index=genes, name="pcc")
    valid = r.dropna()
    nan_genes = [g for g, v in r.items() if np.isnan(v)]
    if valid.empty:
        raise InputError(f"No gene has a defined PCC: all {len(r)} are constant or non-finite on one side.")
    order = np.argsort(-valid.to_numpy(), kind="stable")
    best = list(valid.index[order[: int(n_label)]])
    n_worst = min(int(n_label), len(valid) - len(best))
    worst = list(valid.index[order[::-1][:n_worst]]) if n_worst else []

    ax = _new_ax(ax, (5.5, 3.8))
    kwargs.setdefault("color", "0.7")
    kwargs.setdefault("edgecolor", "white")
    counts, _, _ = ax.hist(valid.to_numpy(), bins=bins, **kwargs)
    mean, median = float(valid.mean()), float(valid.median())
    n_nan = len(nan_genes)
    handles = [
        ax.axvline(mean, color="C0", lw=1.5, label=f"mean {mean:.3f}"),
        ax.axvline(median, color="C1", lw=1.5, ls="--", label=f"median {median:.3f}"),
        Patch(facecolor="none", edgecolor="none", label=f"NaN PCC: {n_nan} gene{'' if n_nan == 1 else 's'}"),
    ]
    if best:
        ax.plot(valid[best].to_numpy(), np.zeros(len(best)), "^", color="C2", ms=6, clip_on=False, gid="pcc_best")
    if worst:
        ax.plot(valid[worst].to_numpy(), np.zeros(len(worst)), "v", color="C3", ms=6, clip_on=False, gid="pcc_worst")
    box = {"boxstyle": "round,pad=0.3", "facecolor": "white", "alpha": 0.8, "edgecolor": "0.8"}
    corners = (("pcc_worst", worst, 0.02, "left", "worst"), ("pcc_best", best, 0.98, "right", "best"))
    for gid, names, x, ha, head in corners:
        if names:
            text = "\n".join([head] + [f"{g}  {valid[g]:.3f}" for g in names])
            ax.text(x, 0.97, text, transform=ax.transAxes, ha=ha, va="top", fontsize="x-small", bbox=box, gid=gid)
    # headroom for the gene lists above the tallest bar
    n_lines = max(len(best), len(worst)) + 1 if n_label else 0
    ax.set_ylim(0, max(counts.max(), 1) * (1.1 + 0.09 * n_lines))
    ax.legend(handles=handles, loc="upper center", fontsize="x-small", frameon=False)
    ax.set_xlabel("PCC (predicted vs measured)")
    ax.set_ylabel("genes")
    ax.set_title(title if title is not None else f"Per-gene PCC ({len(r)} genes, {n_nan} NaN)")
    if save is not None:
        ax.figure.savefig(save, dpi=110, bbox_inches="tight")
    if return_labels:
        return ax, {"best": best, "worst": worst, "nan": nan_genes, "pcc": r}
    return ax


def _history_of(model_or_history) -> Mapping:
    if isinstance(model_or_history, Mapping):
        return model_or_history
    if not hasattr(model_or_history, "history"):
        raise TypeError(
            f"Expected a trained model (with .history) or a history dict, got {type(model_or_history).__name__}."
        )
    history = model_or_history.history
    if not history:
        raise InputError(
            f"{type(model_or_history).__name__}.history is empty: the model is not trained, so there are no "
            f"'train_*' loss terms to plot. Call model.train() first."
        )
    return history


def _curve(values, key: str) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(values, pd.DataFrame):
        if values.shape[1] != 1:
            raise InputError(f"history[{key!r}] has {values.shape[1]} columns; expected one.")
        values = values.iloc[:, 0]
    if isinstance(values, pd.Series):
        y = values.to_numpy(dtype=np.float64)
        # Lightning's history counts epochs from 0; the plot (like the progress bar) from 1
        x = values.index.to_numpy() if pd.api.types.is_numeric_dtype(values.index) else np.arange(len(y))
        return np.asarray(x, dtype=np.float64) + 1, y
    y = np.asarray(values, dtype=np.float64).ravel()
    return np.arange(1, len(y) + 1, dtype=np.float64), y


#: panels of :func:`training_curves`: terms on one scale share one, in this order; other terms join the first
_PANELS = (("losses", ("loss", "nce_query", "nce_neighbor"), "loss"), ("MSE", ("mse",), "MSE"),
           ("validation PCC", ("pcc",), "mean per-gene PCC"))


def training_curves(
    model_or_history,
    keys: Sequence[str] | None = None,
    log: bool = False,
    ax=None,
    title: str | None = None,
    save: str | None = None,
    **kwargs,
):
    """Loss terms over epochs: one solid line per training term and, when the history has it, a
    dashed line of the same colour for the validation term.

    Terms on different scales get panels of their own, side by side: the total loss and the InfoNCE
    terms; the MSE (on the standardised expression; beside InfoNCE terms of 2-6 it would look flat); and
    the validation PCC when training had a validation set.

    Parameters
    ----------
    model_or_history
        A trained :class:`~st_predict.NH2ST` (its ``model.history``), or a history dict like it:
        ``"train_<term>"`` / ``"validation_<term>"`` keys mapping to one-column DataFrames or Series
        indexed by epoch (or plain sequences, one value per epoch). Other keys are ignored.
    keys
        Terms to plot, e.g. ``["loss", "mse"]`` (a ``"train_"`` or ``"validation_"`` prefix is
        accepted and stripped). Default: every term in the history (``loss``, ``mse``,
        ``nce_query``, ``nce_neighbor`` and, with validation, ``pcc`` for NH2ST).
    log
        Logarithmic y axes. Every plotted value must then be positive.
    ax
        One Axes to draw every term into (one scale for all), or one Axes per panel; a new figure when
        ``None``.
    title
        Figure title (default ``"Training curves"``).
    save
        Path to save the figure to.
    **kwargs
        More keyword arguments for :meth:`matplotlib.axes.Axes.plot`.

    Returns
    -------
    A list of :class:`~matplotlib.axes.Axes`, one per panel; their lines are labelled
    ``"<term> (train)"`` and ``"<term> (validation)"``.

    Raises
    ------
    ValueError
        If the model is not trained (empty history), the history has no ``train_*`` /
        ``validation_*`` terms, ``log=True`` with non-positive values (naming the terms), or ``ax`` is
        a list of another length than the panels.
    KeyError
        If a requested term is not in the history (naming it and the available ones).
    """
    from matplotlib.ticker import MaxNLocator

    history = _history_of(model_or_history)
    available: dict[str, None] = {}
    for k in history:
        prefix, _, term = str(k).partition("_")
        if prefix in _PREFIXES and term:
            available[term] = None
    if not available:
        raise InputError(
            "The history has no 'train_<term>' or 'validation_<term>' entries to plot "
            f"(keys: {_missing(list(history))})."
        )
    if keys is None:
        terms = list(available)
    else:
        terms = []
        for k in [keys] if isinstance(keys, str) else keys:
            prefix, _, rest = str(k).partition("_")
            terms.append(rest if prefix in _PREFIXES and rest else str(k))
        terms = list(dict.fromkeys(terms))
        missing = [t for t in terms if t not in available]
        if missing:
            raise MissingKeyError(f"Loss terms not in the history: {missing}; available: {list(available)}.")

    curves = []
    for i, term in enumerate(terms):
        for prefix, ls in zip(_PREFIXES, ("-", "--"), strict=True):
            key = f"{prefix}_{term}"
            if key in history:
                x, y = _curve(history[key], key)
                curves.append((term, key, f"{term} ({prefix})", x, y, ls, f"C{i % 10}"))
    if log:
        bad = [key for _, key, _, _, y, _, _ in curves if np.any(~(y > 0))]
        if bad:
            raise InputError(f"log=True needs positive values, but these have values <= 0 or NaN: {bad}. "
                             "Leave them out with keys= or use log=False.")

    def panel_of(term):
        return next((i for i, (_, members, _) in enumerate(_PANELS) if term in members), 0)

    panels = sorted({panel_of(t) for t in terms})
    if ax is None:
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 0.6, 3.6), squeeze=False)
        axes = list(axes[0])
    elif isinstance(ax, Sequence | np.ndarray):
        axes = list(np.ravel(ax))
        if len(axes) != len(panels):
            raise InputError(f"ax has {len(axes)} Axes but there are {len(panels)} panels "
                             f"({', '.join(_PANELS[p][0] for p in panels)}); pass one Axes, or one per panel.")
    else:
        axes, panels = [ax], [None]
    for a, panel in zip(axes, panels, strict=True):
        for term, _, label, x, y, ls, color in curves:
            if panel is None or panel_of(term) == panel:
                a.plot(x, y, **{"ls": ls, "color": color, "label": label, **kwargs})
        if log:
            a.set_yscale("log")
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        a.set_xlabel("epoch")
        a.set_ylabel("loss" if panel is None else _PANELS[panel][2])
        if panel is not None and len(panels) > 1:
            a.set_title(_PANELS[panel][0], fontsize="medium")
        a.legend(fontsize="x-small")
    fig = axes[0].figure
    if len(axes) == 1:
        axes[0].set_title(title if title is not None else "Training curves")
    else:
        fig.suptitle(title if title is not None else "Training curves")
        fig.tight_layout()
    if save is not None:
        fig.savefig(save, dpi=110, bbox_inches="tight")
    return axes
