"""What the command line's subcommands share: exit codes, the input help, reading the input, checks of
arguments done before the heavy imports."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from st_predict._utils import (
    InputError,
    MissingFileError,
)
from st_predict.module import NetworkSettings

#: exit code for bad input (the same as argparse's usage errors)
EXIT_BAD_INPUT = 2
#: exit code for anything else (a bug, or a crash in a dependency): printed with its traceback
EXIT_ERROR = 1
INPUT_HELP = (
    "input data: an .h5ad file (Visium-style uns['spatial'] images, obsm['spatial'] in full-resolution "
    "pixels), a SpatialData .zarr store, a folder in the HER2ST layout (counts/, spots/, images/), a Space "
    "Ranger output folder (spatial/ + filtered_feature_bc_matrix.h5; see --fullres-image) or a HEST-1k folder "
    "(st/, wsis/, metadata/; see --sample)"
)



def progress(args) -> bool:
    """Progress bars only on a terminal: redirected to a log file they would fill it with redraws."""
    return not args.quiet and sys.stderr.isatty()


def read(args, lazy_images: bool = False):
    from st_predict.data import read_input

    return read_input(args.input, args.library_key, args.image_element, args.table, args.fullres_image, args.sample,
                      lazy_images=lazy_images)


def sections(adata, library_key, sections):
    if not sections:
        return adata
    from st_predict.data import select_sections

    if library_key is None:
        raise InputError("--sections needs a section column (--library-key)")
    return select_sections(adata, sections, library_key)


def model_kwargs(text: str | None) -> dict:
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


def feature_cache(args):
    """``--feature-cache [DIR]``: ``None`` (off), ``True`` (the default folder) or the folder."""
    value = getattr(args, "feature_cache", None)
    return True if value == "" else value


def read_genes(spec: str) -> list[str]:
    p = Path(spec)
    if p.is_file():
        genes = [g.strip() for g in p.read_text().splitlines() if g.strip()]
    else:
        genes = [g.strip() for g in spec.split(",") if g.strip()]
    if not genes:
        raise InputError(f"--genes {spec!r} gives no gene")
    return genes


def check_model_folder(args) -> None:
    """Check that ``args.model`` is a saved model's folder; its ``model.pt`` file is taken to mean the folder."""
    model = Path(args.model)
    if model.is_file() and model.name == "model.pt":
        args.model = str(model.parent)
        return
    if not (model / "model.pt").is_file():
        raise MissingFileError(f"no saved model at {args.model} (expected {model / 'model.pt'}; pass the folder that "
                               "st-predict train wrote)")


def model_and_output(args, suffix: str) -> Path:
    """Check that ``args.model`` is a saved model and ``args.out`` a new (or ``--overwrite``) ``suffix`` path."""
    check_model_folder(args)
    out = Path(args.out)
    if out.suffix != suffix:
        raise InputError(f"--out must end in {suffix}, got {args.out!r}")
    if out.exists() and not args.overwrite:
        raise InputError(f"{out} exists; pass --overwrite")
    return out
