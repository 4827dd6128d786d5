"""The ``st-predict`` command line: ``train``, ``predict``, ``evaluate``, ``benchmark`` and ``demo``.

Each subcommand is a thin layer over the Python API; bad input ends with a one-line error on stderr
and exit code 2 (argparse's own convention for usage errors), success with 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

#: exit code for bad input (the same as argparse's usage errors)
EXIT_BAD_INPUT = 2
_INPUT_HELP = (
    "input data: an .h5ad file (Visium-style uns['spatial'] images, obsm['spatial'] in full-resolution "
    "pixels), a SpatialData .zarr store, a folder in the HER2ST layout (counts/, spots/, images/), a Space "
    "Ranger output folder (spatial/ + filtered_feature_bc_matrix.h5; see --fullres-image) or a HEST-1k folder "
    "(st/, wsis/, metadata/; see --sample)"
)
# what the readers and the model raise for data they cannot use
_BAD_INPUT = (ValueError, KeyError, FileNotFoundError, NotADirectoryError, TypeError, IndexError)


class _BadInput(Exception):
    """A user error the command reports in one line."""


# -- input -----------------------------------------------------------------------------------------
def read_input(path: str, section_key: str = "section", image_element: str | None = None,
               table: str = "table", fullres_image: str | None = None, sample: list[str] | None = None) -> tuple:
    """Read ``path`` into an AnnData; returns ``(adata, library_key, image_key)`` for
    :meth:`~st_predict.NH2ST.setup_anndata`."""

    p = Path(path)
    if not p.exists():
        raise _BadInput(f"input {path!r} does not exist")
    if p.is_file() and p.suffix == ".h5ad":
        adata = _read_h5ad(p)
        if section_key in adata.obs:
            return adata, section_key, None
        libs = list(adata.uns.get("spatial", {}))
        if len(libs) > 1:
            raise _BadInput(
                f"{path}: adata.obs has no section column {section_key!r} but uns['spatial'] has {len(libs)} "
                f"libraries ({libs[:5]}); pass --section-key"
            )
        return adata, None, None
    if p.is_dir() and (p.suffix == ".zarr" or (p / "zarr.json").exists() or (p / ".zgroup").exists()):
        import spatialdata

        from st_predict.data import from_spatialdata

        sdata = spatialdata.read_zarr(p)
        return from_spatialdata(sdata, image_key=image_element, table_key=table), "region", "hires"
    if p.is_dir() and all((p / d).is_dir() for d in ("counts", "spots", "images")):
        from st_predict.data import read_her2st

        return read_her2st(p), "section", None
    if p.is_dir() and ((p / "spatial").is_dir() or (p / "outs" / "spatial").is_dir()):
        from st_predict.data import read_visium

        return read_visium(p, fullres_image_file=fullres_image), "section", "fullres" if fullres_image else "hires"
    if p.is_dir() and (p / "st").is_dir():
        from st_predict.data import read_hest

        ids = sample[0] if sample and len(sample) == 1 else sample
        return read_hest(p, sample_id=ids), "section", "fullres"
    raise _BadInput(
        f"cannot read {path!r}: expected an .h5ad file, a SpatialData .zarr store, a HER2ST-layout folder "
        "(counts/, spots/, images/), a Space Ranger output folder (spatial/) or a HEST-1k folder (st/, wsis/)"
    )


def _progress(args) -> bool:
    """Progress bars only on a terminal: redirected to a log file they would fill it with redraws."""
    return not args.quiet and sys.stderr.isatty()


def _read_h5ad(path: Path, **kwargs):
    """``anndata.read_h5ad`` with a one-line error for a file that is not a readable .h5ad."""
    import anndata as ad

    try:
        return ad.read_h5ad(path, **kwargs)
    except (OSError, KeyError, ValueError, TypeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise _BadInput(f"{path} is not a readable .h5ad file (truncated or corrupted?): {first}") from err


def _read(args) -> tuple:
    return read_input(args.input, args.section_key, args.image_element, args.table, args.fullres_image, args.sample)


def _image_key(adata, library_key, wanted: str | None, found: str | None) -> str:
    """The image to crop from: ``--image-key``, else the reader's, else the largest image of a library."""
    if wanted:
        return wanted
    if found:
        return found
    spatial = adata.uns.get("spatial", {})
    if not spatial:
        raise _BadInput("the data has no uns['spatial'] images")
    entry = next(iter(spatial.values()))
    images = entry.get("images", {})
    if not images:
        raise _BadInput(f"uns['spatial'][{next(iter(spatial))!r}] has no images")
    return _largest(images)  # the highest-resolution image, e.g. 'fullres' or 'hires'


def _largest(images: dict, keys=None) -> str:
    """The key (among ``keys``, default all) of the image with the longest side."""
    return max(keys or images, key=lambda k: max(np.shape(images[k])[:2]))


def _out_of_core_images_to_lowres(adata, max_side: int = 2000) -> None:
    """Replace every image of ``adata.uns['spatial']`` by a downsampled in-memory copy (``lowres``)
    so the AnnData can be written to .h5ad (full-resolution and lazy images stay in the input)."""
    from st_predict.pl._spatial import _lowres

    spatial = adata.uns.get("spatial", {})
    new = {}
    for lib, entry in spatial.items():
        images, sf = entry.get("images", {}), dict(entry.get("scalefactors", {}))
        if images:
            # the largest in-memory image, else the largest lazy one (a whole-slide image is read once)
            key = _largest(images, [k for k in images if isinstance(images[k], np.ndarray)])
            small, factor = _lowres(images[key], max_side)
            new_sf = {k: v for k, v in sf.items() if not k.startswith("tissue_")}
            new_sf["tissue_lowres_scalef"] = float(sf.get(f"tissue_{key}_scalef", 1.0)) * factor
            new[lib] = {"images": {"lowres": small}, "scalefactors": new_sf,
                        **{k: v for k, v in entry.items() if k not in ("images", "scalefactors")}}
        else:
            new[lib] = entry
    adata.uns["spatial"] = new


# -- subcommands -------------------------------------------------------------------------------------
def _cmd_train(args) -> int:
    # arguments are checked before the heavy imports (scvi-tools, torch): a typo fails in a second
    out = Path(args.out)
    checkpoint_dir = args.checkpoint_dir or (out / "checkpoints" if args.resume else None)
    if out.exists() and any(out.iterdir()) and not (args.overwrite or args.resume):
        raise _BadInput(f"output folder {out} exists and is not empty; pass --overwrite (or --resume)")
    if not Path(args.input).exists():
        raise _BadInput(f"input {args.input!r} does not exist")
    import scvi
    import torch

    from st_predict import NH2ST
    from st_predict.data import select_sections

    adata, library_key, found_key = _read(args)
    if args.sections:
        if library_key is None:
            raise _BadInput("--sections needs a section column (--section-key)")
        adata = select_sections(adata, args.sections, library_key)
    image_key = _image_key(adata, library_key, args.image_key, found_key)
    scvi.settings.seed = args.seed
    torch.manual_seed(args.seed)
    NH2ST.setup_anndata(adata, layer=args.layer, library_key=library_key, image_key=image_key,
                        patch_size=args.patch_size, patch_size_um=args.patch_size_um, is_count_data=not args.normalized)
    kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    if args.genes:
        kwargs["genes"] = _read_genes(args.genes)
    else:
        kwargs["n_genes"] = args.n_genes
    for key in ("trunk", "image_size"):  # None: the recipe's
        if getattr(args, key) is not None:
            kwargs[key] = getattr(args, key)
    model = NH2ST(adata, recipe=args.recipe, weights=args.weights, **kwargs)
    print(model.summary_string)
    validation = args.validation
    if validation is not None and len(validation) == 1 and validation[0] in ("section", "random"):
        validation = validation[0]
    model.train(max_epochs=args.epochs, batch_size=args.batch_size, accelerator=args.accelerator,
                devices=args.devices, validation=validation, train_size=args.train_size, lr=args.lr,
                best_epoch=True if validation is not None else None, progress=_progress(args),
                checkpoint_dir=checkpoint_dir, resume=args.resume)
    model.save(str(out), overwrite=True)
    history = {k: v.iloc[:, 0].astype(float).tolist() for k, v in (model.history or {}).items()
               if k.startswith(("train_", "validation_"))}
    (out / "history.json").write_text(json.dumps(history, indent=2))
    if history:
        import matplotlib.pyplot as plt

        from st_predict.pl import training_curves

        ax = training_curves(model)
        ax.figure.savefig(out / "training_curves.png", dpi=110, bbox_inches="tight")
        plt.close(ax.figure)
    print(f"Saved the model ({len(model.genes_)} genes, trained on {adata.n_obs} spots) to {out}/")
    return 0


def _read_genes(spec: str) -> list[str]:
    p = Path(spec)
    if p.is_file():
        genes = [g.strip() for g in p.read_text().splitlines() if g.strip()]
    else:
        genes = [g.strip() for g in spec.split(",") if g.strip()]
    if not genes:
        raise _BadInput(f"--genes {spec!r} gives no gene")
    return genes


def _model_and_output(args, suffix: str) -> Path:
    """Check that ``args.model`` is a saved model and ``args.out`` a new (or ``--overwrite``) ``suffix`` path."""
    if not (Path(args.model) / "model.pt").is_file():
        raise _BadInput(f"no saved model at {args.model} (expected {Path(args.model) / 'model.pt'})")
    out = Path(args.out)
    if out.suffix != suffix:
        raise _BadInput(f"--out must end in {suffix}, got {args.out!r}")
    if out.exists() and not args.overwrite:
        raise _BadInput(f"{out} exists; pass --overwrite")
    return out


@contextlib.contextmanager
def _staged_file(out: Path):
    """Yield a hidden path beside ``out``; on success it replaces ``out`` in one rename (atomic), so an
    interrupted command leaves the old file or the complete new one; on failure it is removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=out.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def _staged_folder(out: Path, overwrite: bool, produces: tuple[str, ...]):
    """Yield a hidden folder beside ``out`` to write a command's files into; on success each file is
    renamed into ``out`` (existing ones replaced only with ``--overwrite``), on failure nothing of the
    run is left. ``produces``: file names (globs) whose presence in ``out`` means an earlier run's
    output."""
    if out.exists() and not out.is_dir():
        raise _BadInput(f"{out} exists and is not a folder")
    old = sorted({p.name for pattern in produces for p in out.glob(pattern)}) if out.is_dir() else []
    if old and not overwrite:
        raise _BadInput(f"{out} already holds {', '.join(old[:3])}{' ...' if len(old) > 3 else ''}; pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.staging-"))
    try:
        yield staging
        out.mkdir(parents=True, exist_ok=True)
        for p in sorted(staging.rglob("*")):
            if p.is_file():
                dest = out / p.relative_to(staging)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(p, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _cmd_predict(args) -> int:
    out = _model_and_output(args, ".h5ad")  # before the heavy imports
    if not Path(args.input).exists():
        raise _BadInput(f"input {args.input!r} does not exist")
    from st_predict import NH2ST

    adata, library_key, found_key = _read(args)
    if args.sections:
        from st_predict.data import select_sections

        if library_key is None:
            raise _BadInput("--sections needs a section column (--section-key)")
        adata = select_sections(adata, args.sections, library_key)
    model = NH2ST.load(args.model, accelerator=args.accelerator)
    setup = model.adata_manager.registry["setup_args"] if model.adata_manager is not None else {}
    saved_key = setup.get("image_key")
    image_key = args.image_key or found_key or saved_key
    images = next(iter(adata.uns.get("spatial", {}).values()), {}).get("images", {})
    if image_key not in images:
        image_key = _image_key(adata, library_key, None, None)
    df = model.predict(adata, key_added=args.key_added, batch_size=args.batch_size, progress=_progress(args),
                       library_key=library_key, image_key=image_key)
    _out_of_core_images_to_lowres(adata)
    with _staged_file(out) as staged:
        adata.write_h5ad(staged)
    print(f"Predicted {df.shape[1]} genes for {df.shape[0]} spots into obsm[{args.key_added!r}] of {out}")
    return 0


def _cmd_predict_slide(args) -> int:
    out = _model_and_output(args, ".zarr")  # before the heavy imports
    if not Path(args.slide).exists():
        raise _BadInput(f"slide {args.slide} does not exist")
    from st_predict import NH2ST

    model = NH2ST.load(args.model, accelerator=args.accelerator)
    sdata = model.predict_slide(args.slide, mpp=args.mpp, pitch_um=args.pitch_um, patch_size_um=args.patch_size_um,
                                batch_size=args.batch_size, key_added=args.key_added, progress=_progress(args),
                                num_workers=args.num_workers, image_key=args.image_element)
    import spatialdata

    result = spatialdata.SpatialData(shapes=dict(sdata.shapes), tables=dict(sdata.tables))
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        staged = Path(tmp) / out.name  # written completely first, then moved into place
        result.write(staged)
        if out.exists():  # the old store steps aside and is removed only once the new one is in place
            old = Path(tmp) / f"{out.name}.old"
            out.rename(old)
        staged.rename(out)
    table = sdata.tables[args.key_added]
    print(f"Predicted {table.n_vars} genes for {table.n_obs} tiles into table {args.key_added!r} of {out}")
    return 0


def _cmd_evaluate(args) -> int:
    import pandas as pd

    from st_predict.metrics import measured_expression

    path = Path(args.predictions)
    if not path.is_file():
        raise _BadInput(f"{args.predictions!r} is not a file (expected the .h5ad written by st-predict predict)")
    adata = _read_h5ad(path)
    if args.key not in adata.obsm:
        raise _BadInput(f"adata.obsm has no predictions {args.key!r} (keys: {list(adata.obsm)})")
    pred = adata.obsm[args.key]
    if not isinstance(pred, pd.DataFrame):
        raise _BadInput(f"adata.obsm[{args.key!r}] is not a DataFrame of predicted genes")
    truth = measured_expression(adata, list(pred.columns), args.layer, is_count_data=not args.normalized)
    if args.section_key in adata.obs:
        sections = adata.obs[args.section_key].astype(str).to_numpy()
    else:
        sections = np.full(adata.n_obs, "all")
    with _staged_folder(Path(args.out), args.overwrite, ("metrics.json", "metrics.md", "pcc_distribution_*.png")) as out:
        meta = adata.uns.get("st_predict", {})
        training = meta.get(args.key, {}).get("training_sections") if isinstance(meta, dict) else None
        training = [str(t) for t in training] if training is not None else None
        rows = _write_evaluation(args, path, pred, truth, sections, out, training)
    out = Path(args.out)
    print(f"Wrote {out / 'metrics.json'}, {out / 'metrics.md'} and {len(rows)} PCC distribution figure(s)")
    return 0


def _nanmean(values) -> float | None:
    values = [v for v in values if v == v]
    return float(np.mean(values)) if values else None


def _json_safe(obj):
    """NaN and inf as null: strict JSON, which every JSON reader parses."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float | np.floating) and not np.isfinite(obj):
        return None
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _write_evaluation(args, path, pred, truth, sections, out: Path, training) -> list:
    import matplotlib.pyplot as plt
    import pandas as pd

    from st_predict.metrics import evaluate, pooled_pcc
    from st_predict.pl import pcc_distribution

    rows, preds, truths = [], [], []
    for sec in pd.unique(sections):
        m = sections == sec
        p, t = pred.loc[m], truth.loc[m]
        rows.append({"section": str(sec), **evaluate(p, t)})
        preds.append(p)
        truths.append(t)
        ax = pcc_distribution(p, t, title=f"Per-gene PCC, section {sec}")
        ax.figure.savefig(out / f"pcc_distribution_{sec}.png", dpi=110, bbox_inches="tight")
        plt.close(ax.figure)
    trained_on = set(training or [])
    for r in rows:
        r["trained_on"] = r["section"] in trained_on
    held_out = [r["pcc"] for r in rows if not r["trained_on"]]
    seen = [r["pcc"] for r in rows if r["trained_on"]]
    result = {
        "predictions": str(path), "key": args.key, "sections": rows,
        "training_sections": sorted(trained_on) if training is not None else None,
        # the headline: sections the model did not train on (a training section's score is optimistic)
        "pcc_mean_over_sections": _nanmean(held_out),
        "pcc_mean_over_training_sections_optimistic": _nanmean(seen),
        "pcc_pooled_optimistic": pooled_pcc(preds, truths),
        "note": "pcc: per-gene PCC within each section, mean over genes (NaN genes are left out of the mean and "
        "counted in n_nan_genes). pcc_mean_over_sections covers only sections the model did not train on "
        "(trained_on: false); sections it trained on score optimistically and are reported apart. "
        "pcc_top50 and pcc_pooled_optimistic are optimistic variants, reported for comparison with papers.",
    }
    if training is None:
        result["note"] += " The predictions do not say which sections the model trained on (written by an older st_predict)."
    (out / "metrics.json").write_text(json.dumps(_json_safe(result), indent=2, allow_nan=False))
    lines = ["| section | trained on | PCC | MSE | MAE | NaN genes | spots | top-50 PCC (optimistic) |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['section']} | {'yes' if r['trained_on'] else 'no'} | {r['pcc']:.3f} | {r['mse']:.4f} | "
              f"{r['mae']:.4f} | {r['n_nan_genes']} | {r['n_spots']} | {r['pcc_top50']:.3f} |" for r in rows]
    headline = result["pcc_mean_over_sections"]
    lines += ["", f"Mean PCC over held-out sections: {'n/a (every section was a training section)' if headline is None else f'{headline:.3f}'}"]
    if seen:
        lines += [f"Mean PCC over the {len(seen)} training section(s), optimistic: {result['pcc_mean_over_training_sections_optimistic']:.3f}"]
    (out / "metrics.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


def _cmd_benchmark(args) -> int:
    from st_predict.benchmark import default_methods, run_benchmark, to_markdown

    methods = default_methods(epochs=args.epochs, seed=args.seed)
    if args.list_methods:
        print("\n".join(methods))
        return 0
    if args.input is None:
        raise _BadInput("give the input data (or --list-methods)")
    if args.methods:
        unknown = [m for m in args.methods if m not in methods]
        if unknown:
            raise _BadInput(f"unknown methods {unknown}; see --list-methods")
        methods = {m: methods[m] for m in args.methods}
    adata, library_key, found_key = _read(args)
    if library_key is None:
        raise _BadInput(f"the benchmark needs several sections: no column {args.section_key!r} in adata.obs")
    image_key = _image_key(adata, library_key, args.image_key, found_key)
    with _staged_folder(Path(args.out), args.overwrite, ("results.json", "results.md")) as staging:
        result = run_benchmark(adata, methods, section_key=library_key, group_key=args.group_key, folds=args.folds,
                               n_genes=args.n_genes, image_key=image_key, patch_size=args.patch_size,
                               image_size=args.image_size, weights=args.weights, seed=args.seed, out_dir=staging)
    print(to_markdown(result))
    print(f"Wrote {Path(args.out) / 'results.json'} and {Path(args.out) / 'results.md'}")
    return 0


def _cmd_demo(args) -> int:
    from st_predict._demo import run_demo

    with _staged_folder(Path(args.out), args.overwrite, ("metrics.json", "predicted_vs_measured.png")) as staging:
        run_demo(data=args.data, out=staging, epochs=args.epochs, test_section=args.test_section,
                 image_size=args.image_size, weights=args.weights, fetch=not args.no_fetch, seed=args.seed)
    print(f"Wrote {Path(args.out) / 'metrics.json'} and {Path(args.out) / 'predicted_vs_measured.png'}")
    return 0


# -- parser ------------------------------------------------------------------------------------------
def _add_input_options(p) -> None:
    p.add_argument("--section-key", default="section",
                   help="obs column naming each spot's section/library (default: section; SpatialData: region)")
    p.add_argument("--image-key", default=None,
                   help="image in uns['spatial'][library]['images'] to crop patches from (default: the largest)")
    p.add_argument("--image-element", default=None, help="SpatialData input: the H&E image element")
    p.add_argument("--table", default="table", help="SpatialData input: the table of spots (default: table)")
    p.add_argument("--fullres-image", default=None,
                   help="Space Ranger input: the full-resolution H&E image (TIFF/JPEG) the spots were mapped on")
    p.add_argument("--sample", nargs="+", default=None, help="HEST-1k input: sample id(s) (default: the only one)")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: ...)" to an option's help only where it says something: not when the help text
    already gives it, nor for required options, flags or options without a default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or action.required or action.default in (None, False, argparse.SUPPRESS)
                or not action.option_strings):
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The ``st-predict`` argument parser."""
    fmt = _HelpFormatter
    parser = argparse.ArgumentParser(
        prog="st-predict",
        description="Predict spatially resolved gene expression from H&E slides with NH2ST. "
        "Predictions are log1p(counts / library size x 1e4) unless the training data was already normalised.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", formatter_class=fmt, help="train NH2ST on sections with H&E and expression",
                       description="Train NH2ST on every spot of INPUT (or of --sections) and save the model "
                       "(model.pt), its loss history (history.json) and training curves (training_curves.png).")
    p.add_argument("input", help=_INPUT_HELP)
    p.add_argument("--out", required=True, help="folder for the saved model")
    _add_input_options(p)
    p.add_argument("--sections", nargs="+", default=None, help="train on these sections only (default: all)")
    p.add_argument("--layer", default=None, help="expression layer (default: X)")
    p.add_argument("--normalized", action="store_true", help="the expression is already log-normalised (not counts)")
    p.add_argument("--n-genes", type=int, default=250, help="predict the N most expressed genes (present in every section)")
    p.add_argument("--genes", default=None, help="comma-separated genes, or a file with one gene per line (overrides --n-genes)")
    p.add_argument("--patch-size", type=float, default=224, help="patch side in full-resolution pixels")
    p.add_argument("--patch-size-um", type=float, default=None,
                   help="patch side in micrometres instead (needs each section's pixel size)")
    p.add_argument("--recipe", choices=["default", "paper"], default="default",
                   help="named settings of the network and its training; the options below override them")
    p.add_argument("--image-size", type=int, default=None,
                   help="trunk input side in pixels, multiple of 32 (recipe: 64; 224 is paper scale, a GPU job)")
    p.add_argument("--trunk", choices=["frozen", "finetune"], default=None,
                   help="frozen: trunk features computed once and cached (fast on CPU); finetune: end to end")
    p.add_argument("--weights", default="imagenet", help="trunk weights: imagenet, random, or a ResNet18 weights file")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (recipe: 20)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="target spots per batch, >= 2 for the contrastive losses (recipe: 32)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (recipe: 1e-3, one-cycle)")
    p.add_argument("--validation", nargs="+", default=None,
                   help="'section' (hold out the last training section), section names, or 'random' (one "
                   "section only; leaky); keeps the epoch with the best validation PCC")
    p.add_argument("--train-size", type=float, default=1.0, help="with --validation random: fraction of spots to train on")
    p.add_argument("--checkpoint-dir", default=None,
                   help="write a checkpoint of the training state after every epoch (last.ckpt; best.ckpt with "
                   "--validation) to this folder")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its last.ckpt (in --checkpoint-dir, default OUT/checkpoints, "
                   "written every epoch); without one, start from the first epoch: the same command serves the first "
                   "run and every restart")
    p.add_argument("--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu")
    p.add_argument("--devices", default="auto", help="Lightning devices: auto, a count, or a list")
    p.add_argument("--model-kwargs", default=None, help='more NH2ST hyperparameters as JSON, e.g. \'{"n_neighbors": 4}\'')
    p.add_argument("--seed", type=int, default=0, help="random seed (scvi-tools and torch)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("predict", formatter_class=fmt, help="predict expression from H&E with a saved model",
                       description="Predict every spot of INPUT from its H&E patch alone (expression not needed) and "
                       "write an .h5ad with the predictions in obsm[KEY] (a spots x genes DataFrame). Images in the "
                       "output are downsampled copies ('lowres', <= 2000 px) so it stays small and plots with "
                       "scanpy/squidpy; the full-resolution images stay in the input.")
    p.add_argument("model", help="folder of a model saved by st-predict train (or NH2ST.save)")
    p.add_argument("input", help=_INPUT_HELP)
    p.add_argument("--out", required=True, help="output .h5ad")
    _add_input_options(p)
    p.add_argument("--sections", nargs="+", default=None,
                   help="predict these sections only (default: all); e.g. the ones the model did not train on")
    p.add_argument("--key-added", default="nh2st", help="obsm key of the predictions")
    p.add_argument("--batch-size", type=int, default=16, help="patches per forward pass")
    p.add_argument("--accelerator", default="auto", help="auto, cpu, gpu")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("predict-slide", formatter_class=fmt, help="predict expression over a whole H&E slide",
                       description="Find the tissue of SLIDE (SVS, NDPI, pyramidal TIFF / OME-TIFF, or a SpatialData "
                       ".zarr with an H&E image element), tile it at the "
                       "model's training spot pitch with tiles of its training patch size in micrometres, predict "
                       "every tile and write a SpatialData zarr: a table of tiles x genes annotating the tile shapes. "
                       "Needs pip install 'st-predict[wsi]'.")
    p.add_argument("model", help="folder of a model saved by st-predict train (or NH2ST.save)")
    p.add_argument("slide", help="whole-slide image file, or a SpatialData .zarr store")
    p.add_argument("--out", required=True, help="output SpatialData .zarr")
    p.add_argument("--mpp", type=float, help="micrometres per level-0 pixel, for a slide whose metadata has none")
    p.add_argument("--pitch-um", type=float, help="distance between tile centres (default: the training spot pitch)")
    p.add_argument("--patch-size-um", type=float,
                   help="tile side in micrometres, for a model trained without a known pixel size")
    p.add_argument("--batch-size", type=int, default=64, help="tiles per forward pass")
    p.add_argument("--image-element", default=None,
                   help="SpatialData input: the H&E image element (needed when it has several)")
    p.add_argument("--num-workers", type=int, default=None,
                   help="processes reading tiles while the network runs (default: none on <= 4 cores)")
    p.add_argument("--key-added", default="nh2st", help="name of the table")
    p.add_argument("--accelerator", default="auto", help="auto, cpu, gpu")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_predict_slide)

    p = sub.add_parser("evaluate", formatter_class=fmt, help="metrics of predictions against measured expression",
                       description="Per section: per-gene PCC (mean over genes, NaN genes counted), MSE, MAE on the "
                       "predictions' scale, plus the labelled optimistic variants (top-50 genes, pooled). Writes "
                       "metrics.json, metrics.md and pcc_distribution_<section>.png.")
    p.add_argument("predictions", help=".h5ad written by st-predict predict, with measured counts in X (or --layer)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--key", default="nh2st", help="obsm key of the predictions")
    p.add_argument("--section-key", default="section", help="obs column of sections (absent: one section)")
    p.add_argument("--layer", default=None, help="measured expression layer (default: X)")
    p.add_argument("--normalized", action="store_true", help="the measured expression is already log-normalised")
    p.add_argument("--overwrite", action="store_true", help="replace the files of an earlier run in the output folder")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("benchmark", formatter_class=fmt, help="leave-one-section-out benchmark of NH2ST and baselines",
                       description="Hold out each section (or each --group-key value) in turn; genes and model "
                       "selection from the training sections only; writes results.json and results.md.")
    p.add_argument("input", nargs="?", default=None, help=_INPUT_HELP)
    p.add_argument("--out", default="benchmark_results", help="output folder")
    _add_input_options(p)
    p.add_argument("--group-key", default=None, help="obs column to hold out by (e.g. patient; default: sections)")
    p.add_argument("--methods", nargs="+", default=None, help="method names (default: all; see --list-methods)")
    p.add_argument("--list-methods", action="store_true", help="print the available methods and exit")
    p.add_argument("--folds", nargs="+", default=None, help="held-out sections/groups to run (default: all)")
    p.add_argument("--n-genes", type=int, default=250, help="genes per fold, chosen on its training sections")
    p.add_argument("--patch-size", type=float, default=224, help="patch side in full-resolution pixels")
    p.add_argument("--image-size", type=int, default=224, help="input side in pixels of the shared frozen trunk "
                   "(frozen-feature baselines)")
    p.add_argument("--weights", default="imagenet", help="trunk weights: imagenet, random, or a file")
    p.add_argument("--epochs", type=int, default=None, help="epochs of the NH2ST rows (default: the recipe's)")
    p.add_argument("--seed", type=int, default=0, help="seed of every method")
    p.add_argument("--overwrite", action="store_true", help="replace the files of an earlier run in the output folder")
    p.set_defaults(func=_cmd_benchmark)

    p = sub.add_parser("demo", formatter_class=fmt,
                       help="train on all sections but one, predict the held-out one, print metrics, save a figure",
                       description="Train NH2ST (default recipe) on HER2ST-format sections, or on the built-in "
                       "synthetic tissue when no data is given and the HER2ST files cannot be fetched; predict the "
                       "held-out section; print PCC/MSE/MAE; write metrics.json and predicted_vs_measured.png.")
    p.add_argument("--data", default=None, help="folder in the HER2ST layout (counts/, spots/, images/)")
    p.add_argument("--out", default="demo_output", help="output folder")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the recipe's, 20)")
    p.add_argument("--test-section", default=None, help="held-out section (default: the first)")
    p.add_argument("--image-size", type=int, default=None,
                   help="trunk input size in px (default: the recipe's, 64; 32 for the synthetic tissue)")
    p.add_argument("--weights", default="imagenet", help="'imagenet', 'random' or a ResNet18 weights file")
    p.add_argument("--no-fetch", action="store_true", help="do not try to download HER2ST")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--overwrite", action="store_true", help="replace the files of an earlier run in the output folder")
    p.set_defaults(func=_cmd_demo)
    return parser


def cli_reference_markdown(width: int = 100) -> str:
    """The command-line reference as Markdown: every subcommand's ``--help``, taken from the parser
    itself (the docs build writes it to ``docs/cli.md``, so the page cannot drift from the code)."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)  # argparse wraps to the terminal width
    try:
        parser = build_parser()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parts = [
            "# Command line\n",
            "`st-predict` runs the jobs of the Python API from a shell. Bad input ends with one `error:` line "
            f"and exit code {EXIT_BAD_INPUT}; no command overwrites an output without `--overwrite`.\n",
            "```text", parser.format_help().rstrip(), "```\n",
        ]
        for name, p in sub.choices.items():
            parts += [f"## st-predict {name}\n", "```text", p.format_help().rstrip(), "```\n"]
        return "\n".join(parts)
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``st-predict`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (_BadInput, *_BAD_INPUT) as err:
        msg = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        print(f"st-predict {args.command}: error: {msg.splitlines()[0] if msg else type(err).__name__}", file=sys.stderr)
        return EXIT_BAD_INPUT
