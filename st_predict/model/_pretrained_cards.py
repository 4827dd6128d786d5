"""The pretrained expression predictors of the lazyslide-models registry: what each was trained on (tile
geometry, feature encoder, output scale), loading one with errors that name the fix, and its licence."""

from __future__ import annotations

import inspect
import os
from dataclasses import asdict, dataclass

from st_predict._utils import InputError, MissingFileError


@dataclass(frozen=True)
class PredictorGeometry:
    """What a predictor expects of its input and gives as output, from its authors' code.

    Attributes
    ----------
    tile_um
        Side of the tissue a tile shows, in micrometres.
    tile_px
        Side of the tile in pixels, as the feature encoder (or the tile model) reads it.
    whole_section
        Whether the predictor must see every spot of a section in one call (a spatial transformer).
    scale
        What its outputs are, before :meth:`~st_predict.Pretrained.calibrate` maps them onto
        ``log1p(counts / library size * 1e4)``.
    source
        Where the geometry and the scale come from.
    """

    tile_um: float
    tile_px: int
    whole_section: bool = False
    scale: str = "unknown"
    source: str = "given by the user"

    def as_dict(self) -> dict:
        return asdict(self)


#: The geometry of the registry's expression predictors (a key not listed here needs ``tile_um=`` and ``tile_px=``).
PREDICTOR_GEOMETRY: dict[str, PredictorGeometry] = {
    "path2space": PredictorGeometry(
        100.0, 224, False, "the authors' training targets (not counts per 10k): mapped by calibrate",
        "path2space-companion ge_model: GridTiler tiles of 100 um (tile_size_px_100_micron) resized to 224 px, "
        "ImageNet normalisation; upstream Macenko-normalises the stain first, st_predict does not"),
    "stpath": PredictorGeometry(
        112.0, 224, True, "log1p(counts): raw counts, not per library size (STPath README)",
        "HEST-1k patches that STPath's GigaPath features come from: 224 px at 0.5 um/px; the spatial transformer "
        "attends over every spot of a section"),
    "deepspotm": PredictorGeometry(
        112.0, 224, False, "log1p(counts / library size * 1e4) (deepspotm's StructureExpression)",
        "DeepSpot-M README: 224 px tiles at native ~20x (about 0.5 um/px)"),
}

#: ``pip install`` lines for what a predictor needs beyond st_predict's ``wsi`` extra.
INSTALL = {"deepspotm": "pip install deepspotm", "stpath": "pip install einops"}


def registry():
    """The lazyslide-models registry, or an error that names the install command."""
    try:
        from lazyslide_models import MODEL_REGISTRY
        from lazyslide_models.base import ModelTask
    except ImportError as err:  # pragma: no cover - the test environment has it
        raise InputError("Pretrained predictors come from lazyslide-models: pip install 'st-predict[pretrained]'.") from err
    return MODEL_REGISTRY, ModelTask


def predictor_class(key: str):
    """The registry class of a feature- or tile-prediction key, and its task (``"feature"`` or ``"tile"``)."""
    models, task = registry()
    cls = models.get(str(key))
    if cls is None:
        raise InputError(f"{key!r} is not a model of the lazyslide-models registry. Expression predictors: "
                         f"{sorted(PREDICTOR_GEOMETRY)}.")
    tasks = cls.task if isinstance(cls.task, list | tuple) else [cls.task]
    if task.feature_prediction in tasks:
        return cls, "feature"
    if task.tile_prediction in tasks:
        return cls, "tile"
    raise InputError(f"{key!r} is a {', '.join(t.name for t in tasks)} model of the lazyslide-models registry, not a "
                     "feature- or tile-prediction model.")


def geometry_for(key: str, tile_um: float | None, tile_px: int | None) -> PredictorGeometry:
    """The recorded geometry of ``key``, with the user's ``tile_um`` / ``tile_px`` in place of its values."""
    known = PREDICTOR_GEOMETRY.get(key)
    if known is None and (tile_um is None or tile_px is None):
        raise InputError(f"st_predict records no tile geometry for {key!r}: pass tile_um= (micrometres of tissue per "
                         "tile) and tile_px= (the tile's side in pixels) as its authors trained it.")
    for name, value in (("tile_um", tile_um), ("tile_px", tile_px)):
        if value is not None and not value > 0:
            raise InputError(f"{name} must be positive, got {value!r}.")
    if known is None:
        return PredictorGeometry(float(tile_um), int(tile_px))
    if tile_um is None and tile_px is None:
        return known
    return PredictorGeometry(float(tile_um if tile_um is not None else known.tile_um),
                             int(tile_px if tile_px is not None else known.tile_px), known.whole_section,
                             known.scale, known.source + "; changed by the user: " +
                             ", ".join(f"{n}={v}" for n, v in (("tile_um", tile_um), ("tile_px", tile_px))
                                       if v is not None))


def card_info(cls) -> dict:
    """Licence, use and provenance of a registry class, as lazyslide-models records them."""

    def text(value):
        return ", ".join(map(str, value)) if isinstance(value, list | tuple) else (None if value is None else str(value))

    return {
        "license": text(getattr(cls, "license", None)) or "not stated",
        "license_url": text(getattr(cls, "license_url", None)),
        "commercial": getattr(cls, "commercial", None),
        "gated": bool(getattr(cls, "is_gated", False)),
        "hf_url": getattr(cls, "hf_url", None),
        "github_url": getattr(cls, "github_url", None),
        "paper_url": getattr(cls, "paper_url", None),
        "vision_encoder": getattr(cls, "vision_encoder", None),
        "param_size": text(getattr(cls, "param_size", None)),
    }


def _hub_errors() -> tuple[type[BaseException], ...]:
    try:
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:  # pragma: no cover
        return (OSError,)
    return (OSError, LocalEntryNotFoundError, HfHubHTTPError)


def load_card(key: str, cls, kwargs: dict):
    """An instance of the registry class ``cls`` with ``kwargs`` (those its ``__init__`` takes; others are an
    error naming the ones it does), its weights read from the given files or the Hugging Face cache. A missing
    package names its install command; missing weights name ``model_path=`` and the Hub files."""
    params = inspect.signature(cls.__init__).parameters
    unknown = sorted(k for k in kwargs if k not in params)
    if unknown:
        takes = sorted(p for p in params if p != "self")
        raise InputError(f"The predictor {key!r} takes {takes}, not {unknown}.")
    for name in ("model_path", "gene_voc_path"):
        path = kwargs.get(name)
        if path is not None and not os.path.isfile(path):
            raise MissingFileError(f"{name}={os.fspath(path)!r} does not exist: give the local copy of {key!r}'s "
                                   "file, or leave it unset to read the published one (download or Hugging Face cache).")
    kwargs = {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in kwargs.items()}
    try:
        return cls(**kwargs)
    except ImportError as err:
        fix = INSTALL.get(key, f"the package named above ({err})")
        raise InputError(f"The predictor {key!r} needs a package that is not installed: {fix}. ({err})") from err
    except _hub_errors() as err:
        info = card_info(cls)
        where = info["hf_url"] or "its Hugging Face repository"
        gated = (" It is gated: accept its terms on the Hub and set HF_TOKEN (or pass token=)." if info["gated"]
                 else "")
        local = " Or pass model_path= (and gene_voc_path=) to local files." if "model_path" in params else ""
        raise MissingFileError(
            f"The weights of {key!r} could not be read ({type(err).__name__}: {err}). Download them once on a machine "
            f"with network (huggingface-cli download, from {where}) into the Hugging Face cache (HF_HOME), then work "
            f"offline with HF_HUB_OFFLINE=1.{local}{gated}") from err
