"""``st-predict predict`` and ``predict-slide``: a saved model on spots, or on a whole slide."""

from __future__ import annotations

import os
from pathlib import Path

from st_predict._utils import (
    PREDICT_BATCH_SIZE,
    PREDICTED_KEY,
    InputError,
    MissingFileError,
    staged_file,
)
from st_predict.cli._common import INPUT_HELP, feature_cache, model_and_output, progress, read, sections
from st_predict.cli._evaluate import reliability_lines
from st_predict.cli._options import (
    CACHE_HELP,
    LOAD_WEIGHTS_HELP,
    add_input_options,
    add_slide_options,
    number,
    slide_kwargs,
)
from st_predict.model import DEFAULT


def _cmd_predict(args) -> int:
    out = model_and_output(args, ".h5ad")  # before the heavy imports
    if not Path(args.input).exists():
        raise MissingFileError(f"input {args.input!r} does not exist")
    if out.exists() and os.path.samefile(out, args.input):
        raise InputError(f"--out {args.out!r} is the input: the output holds downsampled copies of its images, so "
                         "writing it over the input would lose them. Write to another file.")
    from st_predict import NH2ST
    from st_predict.data import choose_image_key, downsample_images

    adata, library_key, found_key = read(args)
    adata = sections(adata, library_key, args.sections)
    model = NH2ST.load(args.model, accelerator=args.accelerator, encoder_weights=args.encoder_weights)
    setup = model.adata_manager.registry["setup_args"] if model.adata_manager is not None else {}
    image_key = args.image_key or found_key or setup.get("image_key")
    images = next(iter(adata.uns.get("spatial", {}).values()), {}).get("images", {})
    if image_key not in images:
        image_key = choose_image_key(adata)
    df = model.predict(adata, key_added=args.key_added, batch_size=args.batch_size, progress=progress(args),
                       library_key=library_key, image_key=image_key, feature_cache=feature_cache(args),
                       interval_level=args.interval_level, allow_off_tissue=args.allow_off_tissue,
                       interval_depth=args.interval_depth)
    downsample_images(adata)
    with staged_file(out) as staged:
        adata.write_h5ad(staged)
    print(f"Predicted {df.shape[1]} genes for {df.shape[0]} spots into obsm[{args.key_added!r}] of {out}")
    if model.has_reliability:
        print(reliability_lines(model, args.key_added, args.interval_level))
    return 0


def _cmd_predict_slide(args) -> int:
    out = model_and_output(args, ".zarr")  # before the heavy imports
    if not Path(args.slide).exists():
        raise MissingFileError(f"slide {args.slide} does not exist")
    from st_predict import NH2ST
    from st_predict.tl import write_prediction

    model = NH2ST.load(args.model, accelerator=args.accelerator, encoder_weights=args.encoder_weights)
    sdata = model.predict_slide(args.slide, progress=progress(args), num_workers=args.num_workers, **slide_kwargs(args))
    write_prediction(sdata, args.key_added, out)
    table = sdata.tables[args.key_added]
    print(f"Predicted {table.n_vars} genes for {table.n_obs} tiles into table {args.key_added!r} of {out}")
    return 0


def add_parsers(sub, fmt, debug) -> None:
    """Add 'predict', 'predict-slide' to the subcommands ``sub``."""
    train = DEFAULT.training  # noqa: F841 - used by some help texts
    p = sub.add_parser("predict", formatter_class=fmt, parents=[debug], help="predict expression from H&E with a saved model",
                       description="Predict every spot of INPUT from its H&E patch alone (expression not needed) and "
                       "write an .h5ad with the predictions in obsm[KEY] (a spots x genes DataFrame). Images in the "
                       "output are downsampled copies ('hires', <= 2000 px, as Space Ranger names them) so it stays small and plots with "
                       "scanpy/squidpy; the full-resolution images stay in the input.")
    p.add_argument("model", help="folder of a model saved by st-predict train (or NH2ST.save)")
    p.add_argument("input", help=INPUT_HELP)
    p.add_argument("--out", required=True, help="output .h5ad")
    add_input_options(p)
    p.add_argument("--sections", nargs="+", default=None,
                   help="predict these sections only (default: all); e.g. the ones the model did not train on")
    p.add_argument("--key-added", default=PREDICTED_KEY, help="obsm key of the predictions")
    p.add_argument("--batch-size", type=number(int, 1), default=PREDICT_BATCH_SIZE, help="patches per forward pass")
    p.add_argument("--encoder-weights", default=None, help=LOAD_WEIGHTS_HELP)
    p.add_argument("--feature-cache", nargs="?", const="", default=None, metavar="DIR", help=CACHE_HELP)
    p.add_argument("--interval-level", type=number(float, 0, strict=True, high=1), default=0.9,
                   help="coverage of the per-spot intervals (models trained with --reliability)")
    p.add_argument("--interval-depth", type=number(float, 0, strict=True), default=None, metavar="UMI",
                   help="the intervals are for a measurement at this many UMI per spot (default: the training "
                   "sections' median); st-predict evaluate rebuilds them at each spot's own depth")
    p.add_argument("--accelerator", default="auto", help="auto, cpu, gpu")
    p.add_argument("--allow-off-tissue", action="store_true",
                   help="predict spots that look misplaced (on glass, swapped x/y, another pixel scale) anyway")
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
    add_slide_options(p)
    p.add_argument("--num-workers", type=number(int, 0), default=None,
                   help="processes reading tiles while the network runs (default: none on <= 4 cores)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_predict_slide)
