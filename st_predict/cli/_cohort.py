"""``st-predict predict-slides``: a cohort of slides on dask.distributed, resumable (issue 19)."""

from __future__ import annotations

import sys
from pathlib import Path

from st_predict._utils import InputError, MissingFileError
from st_predict.cli._common import check_model_folder
from st_predict.cli._options import add_slide_options, number, slide_kwargs

#: exit code when some slides failed (the others were written; the manifest says which and why)
EXIT_SOME_FAILED = 3


def add_predict_slides_parser(sub, fmt, debug) -> None:
    p = sub.add_parser(
        "predict-slides", formatter_class=fmt, parents=[debug], help="predict expression over many whole slides (dask)",
        description="Predict every SLIDE (or every row of --manifest) as predict-slide does, one dask.distributed "
        "task per slide: on a local cluster of --workers processes, or on a running scheduler (--scheduler). Each "
        "slide's output is written atomically to OUT/<slide id>.zarr (the id: the file name without its suffix, "
        "or the CSV's slide_id column); OUT/manifest.csv records each slide's status, tiles, seconds and error. "
        "A slide that fails does not stop the others. Run the same command again to skip the slides that are "
        f"done and retry the failed ones. Exit code 0: all done; {EXIT_SOME_FAILED}: some failed (see the summary "
        "and the manifest). Needs pip install 'st-predict[wsi]' on every worker, which must see MODEL, the slides "
        "and OUT under the same paths.")
    p.add_argument("model", help="folder of a model saved by st-predict train (or NH2ST.save)")
    p.add_argument("slides", nargs="*", metavar="SLIDE", help="slide files (or SpatialData .zarr stores)")
    p.add_argument("--manifest", default=None, metavar="CSV",
                   help="a CSV of slides instead: a 'slide' column (paths relative to the CSV's folder), and "
                   "optionally 'slide_id' and 'mpp'")
    p.add_argument("--out", required=True, help="output folder (one .zarr per slide, and manifest.csv)")
    add_slide_options(p)
    p.add_argument("--workers", type=number(int, 1), default=None,
                   help="worker processes of the local cluster (default: one per core)")
    p.add_argument("--threads-per-worker", type=number(int, 1), default=None,
                   help="torch threads per worker (default: the cores divided among the local workers)")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="a running dask scheduler (tcp://host:8786) instead of a local cluster")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_predict_slides)


def _cmd_predict_slides(args) -> int:
    check_model_folder(args)
    if bool(args.slides) == bool(args.manifest):
        raise InputError("give the slides, or --manifest slides.csv (not both)")
    if args.scheduler and (args.workers or args.threads_per_worker):
        raise InputError("--workers and --threads-per-worker size a local cluster: not with --scheduler")
    missing = [s for s in args.slides if not Path(s).exists()]
    if missing:  # a typo on the command line is bad input; an unreadable slide fails alone
        raise MissingFileError(f"slide {missing[0]} does not exist" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    from st_predict.tl import DONE
    from st_predict.tl import run_cohort as run

    kwargs = slide_kwargs(args)
    load = {"accelerator": args.accelerator, "encoder_weights": args.encoder_weights}
    rows = run(args.model, args.manifest or args.slides, args.out, load_kwargs=load, predict_kwargs=kwargs,
               scheduler=args.scheduler, n_workers=args.workers, torch_threads=args.threads_per_worker,
               progress=not args.quiet and sys.stderr.isatty())  # a bar only on a terminal, as predict-slide
    return 0 if (rows["status"] == DONE).all() else EXIT_SOME_FAILED
