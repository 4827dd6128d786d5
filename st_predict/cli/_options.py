"""Options shared by the ``st-predict`` subcommands: argument types that check ranges at parse time,
groups of options, their help texts and the help formatter. Light imports only (no torch, no scverse)."""

from __future__ import annotations

import argparse
import math
import sys

from st_predict._utils import PATCH_SIZE_PX, SECTION_KEY
from st_predict.model import DEFAULT


class Deprecated(argparse.Action):
    """An old spelling of an option, kept for one release: it works and says what replaced it."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"st-predict: warning: {option_string} is deprecated and will be removed; use {self.new}",
              file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_library_key(p, help_text: str) -> None:
    p.add_argument("--library-key", default=SECTION_KEY, help=help_text)
    p.add_argument("--section-key", dest="library_key", action=Deprecated, new="--library-key",
                   help="deprecated spelling of --library-key")


def add_input_options(p) -> None:
    add_library_key(p, "obs column naming each spot's section/library (default: section; SpatialData: region)")
    p.add_argument("--image-key", default=None,
                   help="image in uns['spatial'][library]['images'] to crop patches from (default: the largest)")
    p.add_argument("--image-element", default=None, help="SpatialData input: the H&E image element")
    p.add_argument("--table", default="table", help="SpatialData input: the table of spots (default: table)")
    p.add_argument("--fullres-image", default=None,
                   help="Space Ranger input: the full-resolution H&E image (TIFF/JPEG) the spots were mapped on")
    p.add_argument("--sample", nargs="+", default=None, help="HEST-1k input: sample id(s) (default: the only one)")


def number(kind: type, low: float | None = None, strict: bool = False, high: float | None = None):
    """An argparse ``type`` that parses an int or float and checks its range at parse time, before any
    heavy import: ``--epochs 0`` or ``--pitch-um -100`` fail in a fraction of a second, with exit code 2."""
    bound = (">" if strict else ">=") + f" {low:g}" if low is not None else ""
    word = "an integer" if kind is int else "a number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {word}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if low is not None and (value <= low if strict else value < low):
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high:g}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


POSITIVE = number(float, 0, strict=True)


def add_patch_options(p) -> None:
    p.add_argument("--patch-size", type=POSITIVE, default=PATCH_SIZE_PX,
                   help="patch side in full-resolution pixels of the input (micrometres where its pixel size is known)")
    p.add_argument("--patch-size-um", type=POSITIVE, default=None,
                   help="patch side in micrometres instead (needs each section's pixel size)")


WEIGHTS_HELP = "ResNet18 trunk weights: imagenet, random, or a ResNet18 weights file"
ENCODER_HELP = ("image encoder: resnet18 (default), a lazyslide-models vision key (uni, uni2, h-optimus-0, virchow2, "
                 "gigapath, ...), a timm name, or hf-hub:ORG/NAME; any but resnet18 is frozen and uses its own input size")
ENCODER_WEIGHTS_HELP = "the encoder's weights as a local file (default: its published weights from the HF cache)"
LOAD_WEIGHTS_HELP = ("where the model's frozen encoder weights are on this machine, when not where they were at "
                      "training (checked against the saved digest)")
CACHE_HELP = ("keep a frozen encoder's features, or an end-to-end trunk's training patches, on disk and reuse "
               "them (DIR, or the default folder: $ST_PREDICT_CACHE_DIR, else ~/.cache/st_predict/features)")


def add_encoder_options(p) -> None:
    p.add_argument("--encoder", default=None, help=ENCODER_HELP)
    p.add_argument("--encoder-weights", default=None, help=ENCODER_WEIGHTS_HELP)
    p.add_argument("--feature-cache", nargs="?", const="", default=None, metavar="DIR", help=CACHE_HELP)
EPOCHS_HELP = f"training epochs (default: the recipe's, {DEFAULT.training.max_epochs})"
IMAGE_SIZE_HELP = (f"trunk input side in pixels, multiple of 32 (default: the recipe's, {DEFAULT.network.image_size}; "
                    "224 is paper scale, a GPU job)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: ...)" to an option's help only where it says something: not when the help text
    already gives it, nor for required options, flags or options without a default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or action.required or action.default in (None, False, argparse.SUPPRESS)
                or not action.option_strings):
            return text
        return super()._get_help_string(action)


def add_slide_options(p) -> None:
    """The options of ``predict-slide`` and ``predict-slides`` that go to ``NH2ST.predict_slide``."""
    from st_predict._utils import PREDICT_BATCH_SIZE, PREDICTED_KEY

    p.add_argument("--mpp", type=POSITIVE,
                   help="micrometres per level-0 pixel, for a slide whose metadata has none (a JPEG or PNG never has)")
    p.add_argument("--image-mpp", type=POSITIVE, default=2.0,
                   help="micrometres per pixel of the slide image written into the output")
    p.add_argument("--no-image", action="store_true", help="write no slide image into the output")
    p.add_argument("--pitch-um", type=POSITIVE, help="distance between tile centres (default: the training spot pitch)")
    p.add_argument("--tile-size-um", type=POSITIVE,
                   help="tile side in micrometres (default: the training patches'); needed only for a model "
                   "trained without a known pixel size")
    p.add_argument("--patch-size-um", dest="tile_size_um", type=POSITIVE, action=Deprecated, new="--tile-size-um",
                   help="deprecated spelling of --tile-size-um")
    p.add_argument("--batch-size", type=number(int, 1), default=PREDICT_BATCH_SIZE, help="tiles per forward pass")
    p.add_argument("--encoder-weights", default=None, help=LOAD_WEIGHTS_HELP)
    p.add_argument("--tissue-method", choices=["entropy", "otsu"], default="entropy",
                   help="how tissue is told from glass: entropy (a smooth stain haze on the glass is not tissue) or "
                   "otsu (a brightness threshold, which keeps pale eosin haze)")
    p.add_argument("--min-tissue-fraction", type=number(float, 0, high=1), default=0.7,
                   help="drop tiles less than this fraction tissue (the fraction is written to the table)")
    p.add_argument("--image-element", default=None,
                   help="SpatialData input: the H&E image element (needed when it has several)")
    p.add_argument("--key-added", default=PREDICTED_KEY, help="name of the table")
    p.add_argument("--accelerator", default="auto", help="auto, cpu, gpu")


def slide_kwargs(args) -> dict:
    """The ``predict_slide`` keywords of the options of :func:`add_slide_options`."""
    return {"mpp": args.mpp, "pitch_um": args.pitch_um, "tile_size_um": args.tile_size_um,
            "batch_size": args.batch_size, "key_added": args.key_added, "image_element": args.image_element,
            "tissue_method": args.tissue_method, "min_tissue_fraction": args.min_tissue_fraction,
            "image_mpp": None if args.no_image else args.image_mpp}
