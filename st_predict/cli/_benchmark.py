"""``st-predict benchmark``: the leave-one-section-out benchmark."""

from __future__ import annotations

from pathlib import Path

from st_predict._utils import (
    DEFAULT_WEIGHTS,
    N_GENES,
    InputError,
    staged_folder,
)
from st_predict.cli._common import INPUT_HELP, feature_cache, read
from st_predict.cli._evaluate import _output_folder
from st_predict.cli._options import (
    EPOCHS_HELP,
    IMAGE_SIZE_HELP,
    WEIGHTS_HELP,
    add_encoder_options,
    add_input_options,
    add_patch_options,
    number,
)
from st_predict.model import DEFAULT


def _pretrained_options(items) -> dict:
    """``--pretrained-option KEY:NAME=VALUE ...`` as ``{KEY: {NAME: VALUE}}`` (numbers, true/false and null read as
    JSON, anything else as text)."""
    import json

    options: dict = {}
    for item in items or ():
        key, sep, rest = item.partition(":")
        name, eq, value = rest.partition("=")
        if not sep or not eq or not key or not name:
            raise InputError(f"--pretrained-option takes KEY:NAME=VALUE (e.g. stpath:model_path=stfm.pth), got {item!r}")
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value
        options.setdefault(key, {})[name] = parsed if isinstance(parsed, int | float | bool) or parsed is None else value
    return options


def _choose(names, methods: dict, pretrained: dict) -> dict:
    """The methods named (a predictor's bare key: its rows in every mode), in the order given."""
    chosen, unknown = {}, []
    for name in names:
        if name in {row.rsplit(" ", 1)[0] for row in pretrained}:
            chosen.update({k: v for k, v in pretrained.items() if k.startswith(f"{name} ")})
        elif name in methods or name in pretrained:
            chosen[name] = methods.get(name) or pretrained[name]
        else:
            unknown.append(name)
    if unknown:
        raise InputError(f"unknown methods {unknown}; see --list-methods")
    return chosen


def _cmd_benchmark(args) -> int:
    from st_predict.benchmark import (
        default_methods,
        frozen_methods,
        pretrained_methods,
        run_benchmark,
        to_markdown,
    )
    from st_predict.data import choose_image_key

    if args.encoder not in (None, DEFAULT.network.encoder):  # a foundation model: the methods on its frozen features
        methods = frozen_methods(epochs=args.epochs, seed=args.seed, reliability=args.reliability)
    else:
        methods = default_methods(epochs=args.epochs, seed=args.seed, reliability=args.reliability)
    options = _pretrained_options(args.pretrained_option)
    pretrained = pretrained_methods(modes=args.pretrained_modes, options=options)
    keys = list(dict.fromkeys(row.rsplit(" ", 1)[0] for row in pretrained))
    unknown = [k for k in options if k not in keys]
    if unknown:
        raise InputError(f"--pretrained-option for {unknown}: not a pretrained predictor ({', '.join(keys)})")
    if args.list_methods:
        print("\n".join(methods))
        print("\n".join(f"{name}  (pretrained; by name only)" for name in pretrained))
        return 0
    if args.input is None:
        raise InputError("give the input data (or --list-methods)")
    if args.methods:
        methods = _choose(args.methods, methods, pretrained)
    out = Path(args.out)
    _output_folder(out, args.overwrite, ("results.json", "results.md"))
    adata, library_key, found_key = read(args)
    if library_key is None:
        raise InputError(f"the benchmark needs several sections: no column {args.library_key!r} in adata.obs")
    image_key = choose_image_key(adata, args.image_key, found_key)
    with staged_folder(out) as staging:
        result = run_benchmark(adata, methods, library_key=library_key, group_key=args.group_key, folds=args.folds,
                               n_genes=args.n_genes, image_key=image_key, patch_size=args.patch_size,
                               patch_size_um=args.patch_size_um, image_size=args.image_size, weights=args.weights,
                               seed=args.seed, out_dir=staging, encoder=args.encoder or DEFAULT.network.encoder,
                               encoder_weights=args.encoder_weights, feature_cache=feature_cache(args))
    print(to_markdown(result))
    print(f"Wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0


def add_parsers(sub, fmt, debug) -> None:
    """Add 'benchmark' to the subcommands ``sub``."""
    train = DEFAULT.training  # noqa: F841 - used by some help texts
    p = sub.add_parser("benchmark", formatter_class=fmt, parents=[debug], help="leave-one-section-out benchmark of NH2ST and baselines",
                       description="Hold out each section (or each --group-key value) in turn; genes and model "
                       "selection from the training sections only; writes results.json and results.md.")
    p.add_argument("input", nargs="?", default=None, help=INPUT_HELP)
    p.add_argument("--out", default="benchmark_results", help="output folder")
    add_input_options(p)
    p.add_argument("--group-key", default=None, help="obs column to hold out by (e.g. patient; default: sections)")
    p.add_argument("--methods", nargs="+", default=None, help="method names (default: all but the pretrained predictors; a predictor's key, e.g. stpath, gives its "
                   "rows; see --list-methods)")
    p.add_argument("--list-methods", action="store_true", help="print the available methods and exit")
    p.add_argument("--folds", nargs="+", default=None, help="held-out sections/groups to run (default: all)")
    p.add_argument("--n-genes", type=number(int, 1), default=N_GENES, help="genes per fold, chosen on its training sections")
    add_patch_options(p)
    p.add_argument("--image-size", type=number(int, 8), default=None, help=IMAGE_SIZE_HELP + "; the shared frozen trunk of the "
                   "frozen-feature baselines")
    p.add_argument("--weights", default=DEFAULT_WEIGHTS, help=WEIGHTS_HELP)
    add_encoder_options(p)
    p.add_argument("--epochs", type=number(int, 1), default=None, help=EPOCHS_HELP + "; NH2ST rows only")
    p.add_argument("--reliability", action="store_true", help="the NH2ST rows train with reliability=True (its fold "
                   "models: one more training per training section) and report interval coverage, width and how well "
                   "the per-gene reliability foretells the held-out PCC")
    p.add_argument("--pretrained-modes", nargs="+", default=["zero-shot", "calibrate", "adapt"],
                   choices=["zero-shot", "calibrate", "adapt"], help="how the pretrained predictors named in --methods "
                   "(path2space, stpath, deepspotm: one row per mode) are fitted on each fold's training sections")
    p.add_argument("--pretrained-option", nargs="+", default=None, metavar="KEY:NAME=VALUE",
                   help="an argument of a pretrained predictor, e.g. stpath:model_path=stfm.pth, "
                   "path2space:encoder_weights=ctranspath.pt2, deepspotm:token=...")
    p.add_argument("--seed", type=int, default=0, help="seed of every method")
    p.add_argument("--overwrite", action="store_true", help="replace the files of an earlier run in the output folder")
    p.set_defaults(func=_cmd_benchmark)
