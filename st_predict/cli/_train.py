"""``st-predict train``: train NH2ST on sections with H&E and expression, save the model."""

from __future__ import annotations

import json
from pathlib import Path

from st_predict._utils import (
    DEFAULT_WEIGHTS,
    N_GENES,
    InputError,
    MissingFileError,
    quiet_logger,
    staged_file,
)
from st_predict.cli._common import INPUT_HELP, feature_cache, model_kwargs, read, read_genes, sections
from st_predict.cli._options import (
    EPOCHS_HELP,
    IMAGE_SIZE_HELP,
    POSITIVE,
    WEIGHTS_HELP,
    add_encoder_options,
    add_input_options,
    add_patch_options,
    number,
)
from st_predict.model import DEFAULT


def _cmd_train(args) -> int:
    # arguments are checked before the heavy imports (scvi-tools, torch): a typo fails in a second
    out = Path(args.out)
    checkpoint_dir = args.checkpoint_dir or (out / "checkpoints" if args.resume else None)
    if out.exists() and any(out.iterdir()) and not (args.overwrite or args.resume):
        raise InputError(f"output folder {out} exists and is not empty; pass --overwrite (or --resume)")
    if not Path(args.input).exists():
        raise MissingFileError(f"input {args.input!r} does not exist")
    kwargs = model_kwargs(args.model_kwargs)
    if args.genes:
        kwargs["genes"] = read_genes(args.genes)
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
    from st_predict.nn import canonical_name, source_of

    adata, library_key, found_key = read(args, lazy_images=True)  # each image decoded only to crop its patches
    adata = sections(adata, library_key, args.sections)
    image_key = choose_image_key(adata, args.image_key, found_key)
    with quiet_logger("lightning.fabric.utilities.seed"):  # not "Seed set to 0"
        scvi.settings.seed = args.seed
    torch.manual_seed(args.seed)
    NH2ST.setup_anndata(adata, layer=args.layer, library_key=library_key, image_key=image_key,
                        patch_size=args.patch_size, patch_size_um=args.patch_size_um, is_count_data=not args.normalized)
    # --weights: the ResNet18's, used when --encoder-weights is not given
    if kwargs.get("encoder_weights") is None and source_of(canonical_name(kwargs.get("encoder") or DEFAULT.network.encoder)).trainable:
        kwargs["encoder_weights"] = args.weights  # the weights of an encoder trained by default (the ResNet18's)
    model = NH2ST(adata, recipe=args.recipe, **kwargs)
    print(model.description)  # not "Training status: Not Trained" before training
    validation = args.validation
    if validation is not None and len(validation) == 1 and validation[0] in ("section", "random"):
        validation = validation[0]
    settings = {"batch_size": args.batch_size, "lr": args.lr}  # options left out keep the recipe's values
    if validation is not None:
        settings.update(validation=validation, best_epoch=True)
    model.train(args.epochs, accelerator=args.accelerator, devices=args.devices, train_size=args.train_size,
                progress=False if args.quiet else None,  # bars on a terminal, a line per epoch in a log file
                checkpoint_dir=checkpoint_dir, resume=args.resume, feature_cache=feature_cache(args),
                reliability=args.reliability, **{k: v for k, v in settings.items() if v is not None})
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


def add_parsers(sub, fmt, debug) -> None:
    """Add 'train' to the subcommands ``sub``."""
    train = DEFAULT.training
    p = sub.add_parser("train", formatter_class=fmt, parents=[debug], help="train NH2ST on sections with H&E and expression",
                       description="Train NH2ST on every spot of INPUT (or of --sections) and save the model "
                       "(model.pt), its loss history (history.json) and training curves (training_curves.png).")
    p.add_argument("input", help=INPUT_HELP)
    p.add_argument("--out", required=True, help="folder for the saved model")
    add_input_options(p)
    p.add_argument("--sections", nargs="+", default=None, help="train on these sections only (default: all)")
    p.add_argument("--layer", default=None, help="expression layer (default: X)")
    p.add_argument("--normalized", action="store_true", help="the expression is already log-normalised (not counts)")
    p.add_argument("--n-genes", type=number(int, 1), default=N_GENES, help="predict the N most expressed genes (present in every section)")
    p.add_argument("--genes", default=None, help="comma-separated genes, or a file with one gene per line (overrides --n-genes)")
    add_patch_options(p)
    p.add_argument("--recipe", choices=["default", "paper"], default="default",
                   help="named settings of the network and its training; the options below override them")
    p.add_argument("--image-size", type=number(int, 8), default=None, help=IMAGE_SIZE_HELP)
    p.add_argument("--trunk", choices=["frozen", "finetune"], default=None,
                   help="frozen: trunk features computed once and cached (fast on CPU); finetune: end to end")
    p.add_argument("--weights", default=DEFAULT_WEIGHTS, help=WEIGHTS_HELP)
    add_encoder_options(p)
    p.add_argument("--epochs", type=number(int, 1), default=None, help=EPOCHS_HELP)
    p.add_argument("--batch-size", type=number(int, 2), default=None,
                   help=f"target spots per batch, >= 2 for the contrastive losses (recipe: {train.batch_size})")
    p.add_argument("--lr", type=POSITIVE, default=None, help=f"learning rate (recipe: {train.lr:g}, {train.schedule})")
    p.add_argument("--validation", nargs="+", default=None,
                   help="'section' (hold out the last training section), section names, or 'random' (one "
                   "section only; leaky); keeps the epoch with the best validation PCC")
    p.add_argument("--train-size", type=number(float, 0, strict=True, high=1), default=1.0, help="with --validation random: fraction of spots to train on")
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
