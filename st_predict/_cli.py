"""The ``st-predict`` command line: ``train``, ``predict``, ``predict-slide``, ``predict-slides``, ``evaluate``,
``benchmark`` and ``demo``.

Each subcommand is a thin layer over the Python API. Bad input (an :class:`~st_predict.InputError`,
raised where the input is checked) ends with a one-line error on stderr and exit code 2 (argparse's
own convention for usage errors); anything else is a bug or a crash in a dependency, shown with its
traceback and exit code 1. ``--debug`` shows the traceback of bad input too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
import warnings
from pathlib import Path

from st_predict._atomic import staged_file, staged_folder
from st_predict._cli_cohort import add_predict_slides_parser
from st_predict._cli_evaluate import _cmd_evaluate, _output_folder, reliability_lines
from st_predict._cli_options import (
    CACHE_HELP as _CACHE_HELP,
)
from st_predict._cli_options import (
    EPOCHS_HELP as _EPOCHS_HELP,
)
from st_predict._cli_options import (
    IMAGE_SIZE_HELP as _IMAGE_SIZE_HELP,
)
from st_predict._cli_options import (
    LOAD_WEIGHTS_HELP as _LOAD_WEIGHTS_HELP,
)
from st_predict._cli_options import (
    POSITIVE as _POSITIVE,
)
from st_predict._cli_options import (
    WEIGHTS_HELP as _WEIGHTS_HELP,
)
from st_predict._cli_options import (
    HelpFormatter as _HelpFormatter,
)
from st_predict._cli_options import (
    add_encoder_options as _add_encoder_options,
)
from st_predict._cli_options import (
    add_input_options as _add_input_options,
)
from st_predict._cli_options import (
    add_library_key as _add_library_key,
)
from st_predict._cli_options import (
    add_patch_options as _add_patch_options,
)
from st_predict._cli_options import (
    add_slide_options as _add_slide_options,
)
from st_predict._cli_options import (
    number as _number,
)
from st_predict._cli_options import (
    slide_kwargs as _slide_kwargs,
)
from st_predict._cohort import write_prediction
from st_predict._constants import (
    DEFAULT_WEIGHTS,
    N_GENES,
    PREDICT_BATCH_SIZE,
    PREDICTED_KEY,
)
from st_predict._errors import InputError, MissingFileError
from st_predict._logging import quiet_logger
from st_predict._settings import DEFAULT, NetworkSettings

#: exit code for bad input (the same as argparse's usage errors)
EXIT_BAD_INPUT = 2
#: exit code for anything else (a bug, or a crash in a dependency): printed with its traceback
EXIT_ERROR = 1
_INPUT_HELP = (
    "input data: an .h5ad file (Visium-style uns['spatial'] images, obsm['spatial'] in full-resolution "
    "pixels), a SpatialData .zarr store, a folder in the HER2ST layout (counts/, spots/, images/), a Space "
    "Ranger output folder (spatial/ + filtered_feature_bc_matrix.h5; see --fullres-image) or a HEST-1k folder "
    "(st/, wsis/, metadata/; see --sample)"
)


def _progress(args) -> bool:
    """Progress bars only on a terminal: redirected to a log file they would fill it with redraws."""
    return not args.quiet and sys.stderr.isatty()


def _read(args, lazy_images: bool = False):
    from st_predict.data import read_input

    return read_input(args.input, args.library_key, args.image_element, args.table, args.fullres_image, args.sample,
                      lazy_images=lazy_images)


def _sections(adata, library_key, sections):
    if not sections:
        return adata
    from st_predict.data import select_sections

    if library_key is None:
        raise InputError("--sections needs a section column (--library-key)")
    return select_sections(adata, sections, library_key)


def _model_kwargs(text: str | None) -> dict:
    """``--model-kwargs`` as a dict of network settings, checked here (a typo is bad input)."""
    if not text:
        return {}
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"--model-kwargs is not valid JSON ({err}): {text!r}") from err
    if not isinstance(kwargs, dict):
        raise InputError(f"--model-kwargs must be a JSON object, got {text!r}")
    unknown = sorted(set(kwargs) - set(NetworkSettings.names()))
    if unknown:
        raise InputError(f"--model-kwargs: unknown network settings {unknown}; they are {list(NetworkSettings.names())}")
    return kwargs


# -- subcommands -------------------------------------------------------------------------------------
def _cmd_train(args) -> int:
    # arguments are checked before the heavy imports (scvi-tools, torch): a typo fails in a second
    out = Path(args.out)
    checkpoint_dir = args.checkpoint_dir or (out / "checkpoints" if args.resume else None)
    if out.exists() and any(out.iterdir()) and not (args.overwrite or args.resume):
        raise InputError(f"output folder {out} exists and is not empty; pass --overwrite (or --resume)")
    if not Path(args.input).exists():
        raise MissingFileError(f"input {args.input!r} does not exist")
    kwargs = _model_kwargs(args.model_kwargs)
    if args.genes:
        kwargs["genes"] = _read_genes(args.genes)
    else:
        kwargs["n_genes"] = args.n_genes
    for key in ("trunk", "image_size", "encoder", "encoder_weights"):  # None: the recipe's
        if getattr(args, key) is not None:
            kwargs[key] = getattr(args, key)
    if args.encoder_weights is not None and not Path(args.encoder_weights).is_file():
        raise MissingFileError(f"--encoder-weights {args.encoder_weights!r} is not a file")
    import scvi
    import torch

    from st_predict import NH2ST
    from st_predict.data import choose_image_key

    adata, library_key, found_key = _read(args, lazy_images=True)  # each image decoded only to crop its patches
    adata = _sections(adata, library_key, args.sections)
    image_key = choose_image_key(adata, args.image_key, found_key)
    with quiet_logger("lightning.fabric.utilities.seed"):  # not "Seed set to 0"
        scvi.settings.seed = args.seed
    torch.manual_seed(args.seed)
    NH2ST.setup_anndata(adata, layer=args.layer, library_key=library_key, image_key=image_key,
                        patch_size=args.patch_size, patch_size_um=args.patch_size_um, is_count_data=not args.normalized)
    model = NH2ST(adata, recipe=args.recipe, weights=args.weights, **kwargs)
    print(model.description)  # not "Training status: Not Trained" before training
    validation = args.validation
    if validation is not None and len(validation) == 1 and validation[0] in ("section", "random"):
        validation = validation[0]
    model.train(max_epochs=args.epochs, batch_size=args.batch_size, accelerator=args.accelerator,
                devices=args.devices, validation=validation, train_size=args.train_size, lr=args.lr,
                best_epoch=True if validation is not None else None,
                progress=False if args.quiet else None,  # bars on a terminal, a line per epoch in a log file
                checkpoint_dir=checkpoint_dir, resume=args.resume, feature_cache=_feature_cache(args),
                reliability=args.reliability)
    model.save(str(out), overwrite=True)
    history = {k: v.iloc[:, 0].astype(float).tolist() for k, v in (model.history or {}).items()
               if k.startswith(("train_", "validation_"))}
    with staged_file(out / "history.json") as staged:
        staged.write_text(json.dumps(history, indent=2))
    if history:
        import matplotlib.pyplot as plt

        from st_predict.pl import training_curves

        fig = training_curves(model)[0].figure
        with staged_file(out / "training_curves.png") as staged:
            fig.savefig(staged, dpi=110, bbox_inches="tight", format="png")
        plt.close(fig)
    print(f"Saved the model ({len(model.genes_)} genes, trained on {adata.n_obs} spots) to {out}/")
    return 0


def _feature_cache(args):
    """``--feature-cache [DIR]``: ``None`` (off), ``True`` (the default folder) or the folder."""
    value = getattr(args, "feature_cache", None)
    return True if value == "" else value


def _read_genes(spec: str) -> list[str]:
    p = Path(spec)
    if p.is_file():
        genes = [g.strip() for g in p.read_text().splitlines() if g.strip()]
    else:
        genes = [g.strip() for g in spec.split(",") if g.strip()]
    if not genes:
        raise InputError(f"--genes {spec!r} gives no gene")
    return genes


def _model_and_output(args, suffix: str) -> Path:
    """Check that ``args.model`` is a saved model and ``args.out`` a new (or ``--overwrite``) ``suffix`` path."""
    if not (Path(args.model) / "model.pt").is_file():
        raise MissingFileError(f"no saved model at {args.model} (expected {Path(args.model) / 'model.pt'})")
    out = Path(args.out)
    if out.suffix != suffix:
        raise InputError(f"--out must end in {suffix}, got {args.out!r}")
    if out.exists() and not args.overwrite:
        raise InputError(f"{out} exists; pass --overwrite")
    return out


def _cmd_predict(args) -> int:
    out = _model_and_output(args, ".h5ad")  # before the heavy imports
    if not Path(args.input).exists():
        raise MissingFileError(f"input {args.input!r} does not exist")
    from st_predict import NH2ST
    from st_predict.data import choose_image_key, downsample_images

    adata, library_key, found_key = _read(args)
    adata = _sections(adata, library_key, args.sections)
    model = NH2ST.load(args.model, accelerator=args.accelerator, encoder_weights=args.encoder_weights)
    setup = model.adata_manager.registry["setup_args"] if model.adata_manager is not None else {}
    image_key = args.image_key or found_key or setup.get("image_key")
    images = next(iter(adata.uns.get("spatial", {}).values()), {}).get("images", {})
    if image_key not in images:
        image_key = choose_image_key(adata)
    df = model.predict(adata, key_added=args.key_added, batch_size=args.batch_size, progress=_progress(args),
                       library_key=library_key, image_key=image_key, feature_cache=_feature_cache(args),
                       interval_level=args.interval_level)
    downsample_images(adata)
    with staged_file(out) as staged:
        adata.write_h5ad(staged)
    print(f"Predicted {df.shape[1]} genes for {df.shape[0]} spots into obsm[{args.key_added!r}] of {out}")
    if model.has_reliability:
        print(reliability_lines(model, args.key_added, args.interval_level))
    return 0


def _cmd_predict_slide(args) -> int:
    out = _model_and_output(args, ".zarr")  # before the heavy imports
    if not Path(args.slide).exists():
        raise MissingFileError(f"slide {args.slide} does not exist")
    from st_predict import NH2ST

    model = NH2ST.load(args.model, accelerator=args.accelerator, encoder_weights=args.encoder_weights)
    sdata = model.predict_slide(args.slide, progress=_progress(args), num_workers=args.num_workers, **_slide_kwargs(args))
    write_prediction(sdata, args.key_added, out)
    table = sdata.tables[args.key_added]
    print(f"Predicted {table.n_vars} genes for {table.n_obs} tiles into table {args.key_added!r} of {out}")
    return 0


def _cmd_benchmark(args) -> int:
    from st_predict.benchmark import default_methods, frozen_methods, run_benchmark, to_markdown
    from st_predict.data import choose_image_key

    if args.encoder not in (None, "resnet18"):  # a foundation model: the methods on its frozen features
        methods = frozen_methods(epochs=args.epochs, seed=args.seed)
    else:
        methods = default_methods(epochs=args.epochs, seed=args.seed)
    if args.list_methods:
        print("\n".join(methods))
        return 0
    if args.input is None:
        raise InputError("give the input data (or --list-methods)")
    if args.methods:
        unknown = [m for m in args.methods if m not in methods]
        if unknown:
            raise InputError(f"unknown methods {unknown}; see --list-methods")
        methods = {m: methods[m] for m in args.methods}
    out = Path(args.out)
    _output_folder(out, args.overwrite, ("results.json", "results.md"))
    adata, library_key, found_key = _read(args)
    if library_key is None:
        raise InputError(f"the benchmark needs several sections: no column {args.library_key!r} in adata.obs")
    image_key = choose_image_key(adata, args.image_key, found_key)
    with staged_folder(out) as staging:
        result = run_benchmark(adata, methods, library_key=library_key, group_key=args.group_key, folds=args.folds,
                               n_genes=args.n_genes, image_key=image_key, patch_size=args.patch_size,
                               patch_size_um=args.patch_size_um, image_size=args.image_size, weights=args.weights,
                               seed=args.seed, out_dir=staging, encoder=args.encoder or "resnet18",
                               encoder_weights=args.encoder_weights, feature_cache=_feature_cache(args))
    print(to_markdown(result))
    print(f"Wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0


def _cmd_demo(args) -> int:
    from st_predict._demo import run_demo

    out = Path(args.out)
    _output_folder(out, args.overwrite, ("metrics.json", "predicted_vs_measured.png"))
    with staged_folder(out) as staging:
        run_demo(data=args.data, out=staging, epochs=args.epochs, test_section=args.test_section,
                 image_size=args.image_size, weights=args.weights, fetch=not args.no_fetch, seed=args.seed)
    print(f"Wrote {out / 'metrics.json'} and {out / 'predicted_vs_measured.png'}")
    return 0


# -- parser ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The ``st-predict`` argument parser."""
    fmt = _HelpFormatter
    parser = argparse.ArgumentParser(
        prog="st-predict",
        description="Predict spatially resolved gene expression from H&E slides with NH2ST. "
        "Predictions are log1p(counts / library size x 1e4) unless the training data was already normalised.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of every error, bad input too")
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the traceback of every error, bad input too")
    train = DEFAULT.training
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", formatter_class=fmt, parents=[debug], help="train NH2ST on sections with H&E and expression",
                       description="Train NH2ST on every spot of INPUT (or of --sections) and save the model "
                       "(model.pt), its loss history (history.json) and training curves (training_curves.png).")
    p.add_argument("input", help=_INPUT_HELP)
    p.add_argument("--out", required=True, help="folder for the saved model")
    _add_input_options(p)
    p.add_argument("--sections", nargs="+", default=None, help="train on these sections only (default: all)")
    p.add_argument("--layer", default=None, help="expression layer (default: X)")
    p.add_argument("--normalized", action="store_true", help="the expression is already log-normalised (not counts)")
    p.add_argument("--n-genes", type=_number(int, 1), default=N_GENES, help="predict the N most expressed genes (present in every section)")
    p.add_argument("--genes", default=None, help="comma-separated genes, or a file with one gene per line (overrides --n-genes)")
    _add_patch_options(p)
    p.add_argument("--recipe", choices=["default", "paper"], default="default",
                   help="named settings of the network and its training; the options below override them")
    p.add_argument("--image-size", type=_number(int, 8), default=None, help=_IMAGE_SIZE_HELP)
    p.add_argument("--trunk", choices=["frozen", "finetune"], default=None,
                   help="frozen: trunk features computed once and cached (fast on CPU); finetune: end to end")
    p.add_argument("--weights", default=DEFAULT_WEIGHTS, help=_WEIGHTS_HELP)
    _add_encoder_options(p)
    p.add_argument("--epochs", type=_number(int, 1), default=None, help=_EPOCHS_HELP)
    p.add_argument("--batch-size", type=_number(int, 2), default=None,
                   help=f"target spots per batch, >= 2 for the contrastive losses (recipe: {train.batch_size})")
    p.add_argument("--lr", type=_POSITIVE, default=None, help=f"learning rate (recipe: {train.lr:g}, {train.schedule})")
    p.add_argument("--validation", nargs="+", default=None,
                   help="'section' (hold out the last training section), section names, or 'random' (one "
                   "section only; leaky); keeps the epoch with the best validation PCC")
    p.add_argument("--train-size", type=_number(float, 0, strict=True, high=1), default=1.0, help="with --validation random: fraction of spots to train on")
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
    p.add_argument("--reliability", action="store_true",
                   help="also train one model per section with it held out (K more trainings for K sections): each "
                   "gene's reliability on a new section, and calibrated per-spot intervals that predict writes")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("predict", formatter_class=fmt, parents=[debug], help="predict expression from H&E with a saved model",
                       description="Predict every spot of INPUT from its H&E patch alone (expression not needed) and "
                       "write an .h5ad with the predictions in obsm[KEY] (a spots x genes DataFrame). Images in the "
                       "output are downsampled copies ('hires', <= 2000 px, as Space Ranger names them) so it stays small and plots with "
                       "scanpy/squidpy; the full-resolution images stay in the input.")
    p.add_argument("model", help="folder of a model saved by st-predict train (or NH2ST.save)")
    p.add_argument("input", help=_INPUT_HELP)
    p.add_argument("--out", required=True, help="output .h5ad")
    _add_input_options(p)
    p.add_argument("--sections", nargs="+", default=None,
                   help="predict these sections only (default: all); e.g. the ones the model did not train on")
    p.add_argument("--key-added", default=PREDICTED_KEY, help="obsm key of the predictions")
    p.add_argument("--batch-size", type=_number(int, 1), default=PREDICT_BATCH_SIZE, help="patches per forward pass")
    p.add_argument("--encoder-weights", default=None, help=_LOAD_WEIGHTS_HELP)
    p.add_argument("--feature-cache", nargs="?", const="", default=None, metavar="DIR", help=_CACHE_HELP)
    p.add_argument("--interval-level", type=_number(float, 0, strict=True, high=1), default=0.9,
                   help="coverage of the per-spot intervals (models trained with --reliability)")
    p.add_argument("--accelerator", default="auto", help="auto, cpu, gpu")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("predict-slide", formatter_class=fmt, parents=[debug], help="predict expression over a whole H&E slide",
                       description="Find the tissue of SLIDE (SVS, NDPI, pyramidal TIFF / OME-TIFF, a plain JPEG, PNG or "
                       "TIFF with --mpp, or a SpatialData .zarr with an H&E image element), tile it at the "
                       "model's training spot pitch with tiles of its training patch size in micrometres, predict "
                       "every tile and write a SpatialData zarr: a table of tiles x genes annotating the tile shapes, "
                       "and the slide downsampled (an image element), so spatialdata-plot draws the tiles over the "
                       "H&E. Needs pip install 'st-predict[wsi]'.")
    p.add_argument("model", help="folder of a model saved by st-predict train (or NH2ST.save)")
    p.add_argument("slide", help="whole-slide image file, plain image (JPEG, PNG, TIFF), or a SpatialData .zarr store")
    p.add_argument("--out", required=True, help="output SpatialData .zarr")
    _add_slide_options(p)
    p.add_argument("--num-workers", type=_number(int, 0), default=None,
                   help="processes reading tiles while the network runs (default: none on <= 4 cores)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_predict_slide)
    add_predict_slides_parser(sub, fmt, debug)

    p = sub.add_parser("evaluate", formatter_class=fmt, parents=[debug], help="metrics of predictions against measured expression",
                       description="Per section: per-gene PCC (mean over genes, NaN genes counted), MSE, MAE on the "
                       "predictions' scale, plus the labelled optimistic variants (top-50 genes, pooled). Writes "
                       "metrics.json, metrics.md and pcc_distribution_<section>.png.")
    p.add_argument("predictions", help=".h5ad written by st-predict predict, with measured counts in X (or --layer)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--key", default=PREDICTED_KEY, help="obsm key of the predictions")
    _add_library_key(p, "obs column of sections (absent: one section)")
    p.add_argument("--layer", default=None, help="measured expression layer (default: X)")
    p.add_argument("--normalized", action="store_true", help="the measured expression is already log-normalised")
    p.add_argument("--overwrite", action="store_true", help="replace the files of an earlier run in the output folder")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("benchmark", formatter_class=fmt, parents=[debug], help="leave-one-section-out benchmark of NH2ST and baselines",
                       description="Hold out each section (or each --group-key value) in turn; genes and model "
                       "selection from the training sections only; writes results.json and results.md.")
    p.add_argument("input", nargs="?", default=None, help=_INPUT_HELP)
    p.add_argument("--out", default="benchmark_results", help="output folder")
    _add_input_options(p)
    p.add_argument("--group-key", default=None, help="obs column to hold out by (e.g. patient; default: sections)")
    p.add_argument("--methods", nargs="+", default=None, help="method names (default: all; see --list-methods)")
    p.add_argument("--list-methods", action="store_true", help="print the available methods and exit")
    p.add_argument("--folds", nargs="+", default=None, help="held-out sections/groups to run (default: all)")
    p.add_argument("--n-genes", type=_number(int, 1), default=N_GENES, help="genes per fold, chosen on its training sections")
    _add_patch_options(p)
    p.add_argument("--image-size", type=_number(int, 8), default=None, help=_IMAGE_SIZE_HELP + "; the shared frozen trunk of the "
                   "frozen-feature baselines")
    p.add_argument("--weights", default=DEFAULT_WEIGHTS, help=_WEIGHTS_HELP)
    _add_encoder_options(p)
    p.add_argument("--epochs", type=_number(int, 1), default=None, help=_EPOCHS_HELP + "; NH2ST rows only")
    p.add_argument("--seed", type=int, default=0, help="seed of every method")
    p.add_argument("--overwrite", action="store_true", help="replace the files of an earlier run in the output folder")
    p.set_defaults(func=_cmd_benchmark)

    p = sub.add_parser("demo", formatter_class=fmt, parents=[debug],
                       help="train on all sections but one, predict the held-out one, print metrics, save a figure",
                       description="Train NH2ST (default recipe) on HER2ST-format sections, or on the built-in "
                       "synthetic tissue when no data is given and the HER2ST files cannot be fetched; predict the "
                       "held-out section; print PCC/MSE/MAE; write metrics.json and predicted_vs_measured.png.")
    p.add_argument("--data", default=None, help="folder in the HER2ST layout (counts/, spots/, images/)")
    p.add_argument("--out", default="demo_output", help="output folder")
    p.add_argument("--epochs", type=_number(int, 1), default=None, help=_EPOCHS_HELP)
    p.add_argument("--test-section", default=None, help="held-out section (default: the first)")
    p.add_argument("--image-size", type=_number(int, 8), default=None, help=_IMAGE_SIZE_HELP + "; 32 for the synthetic tissue")
    p.add_argument("--weights", default=DEFAULT_WEIGHTS, help=_WEIGHTS_HELP)
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
            f"and exit code {EXIT_BAD_INPUT}; anything else is a bug and shows its traceback (exit code {EXIT_ERROR}); "
            "`--debug` shows the traceback of bad input too. No command overwrites an output without `--overwrite`.\n",
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


def _version() -> str:
    from st_predict import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``st-predict`` command; returns the exit code: 0, 2 for bad input (one line on
    stderr), 1 for anything else (with its traceback)."""
    parser = build_parser()
    args = parser.parse_args(argv)

    def one_line(message, category, filename, lineno, file=None, line=None):  # a warning is news, not code
        print(f"st-predict {args.command}: {category.__name__}: {message}", file=sys.stderr, flush=True)

    try:
        with warnings.catch_warnings():  # restores warnings.showwarning on the way out
            warnings.showwarning = one_line
            return args.func(args)
    except InputError as err:
        if args.debug:
            traceback.print_exc()
        msg = str(err)
        print(f"st-predict {args.command}: error: {msg.splitlines()[0] if msg else type(err).__name__}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception:  # noqa: BLE001 - a bug, or a crash in a dependency: never dressed up as bad input
        traceback.print_exc()
        print(f"st-predict {args.command}: internal error (traceback above); rerun with --debug, and please report "
              "it if the input looks right", file=sys.stderr)
        return EXIT_ERROR
