"""The plumbing shared by st_predict's subpackages: errors, constants, atomic writes, thread limits, warnings,
quiet loggers, lazy imports. Import from here (``from st_predict._utils import InputError``), never from its
modules: they are private to this package."""

from ._constants import (
    DEFAULT_WEIGHTS,
    N_GENES,
    PATCH_SIZE_PX,
    PREDICT_BATCH_SIZE,
    PREDICTED_KEY,
    PRETRAINED_KEY,
    REGISTRY_KEYS,
    SECTION_KEY,
)
from ._errors import InputError, InputTypeError, InputWarning, MissingFileError, MissingKeyError
from ._lazy import lazy_exports

# torch and numpy load on first use: the command line's argument parsing imports this package
__getattr__, __dir__ = lazy_exports(__name__, {
    "commit_file": "._atomic", "staged_file": "._atomic", "staged_folder": "._atomic", "staging_path": "._atomic",
    "import_squidpy": "._deps",
    "downsample": "._images", "footprint_fraction": "._images", "interval_overlap": "._images", "spot_shape": "._images", "resize_patch": "._images", "resize_tile": "._images",
    "digest": "._hashing", "file_digest": "._hashing",
    "eval_mode": "._batches", "index_batches": "._batches", "run_batches": "._batches",
    "quiet_logger": "._logging", "progress_logger": "._logging",
    "available_cores": "._threads", "interactive": "._threads", "single_thread_worker": "._threads",
    "thread_limits": "._threads",
    "user_stacklevel": "._warnings", "warn": "._warnings",
}, eager=globals())

__all__ = [
    "DEFAULT_WEIGHTS", "N_GENES", "PATCH_SIZE_PX", "PREDICTED_KEY", "PRETRAINED_KEY", "PREDICT_BATCH_SIZE", "REGISTRY_KEYS", "SECTION_KEY",
    "InputError", "InputTypeError", "InputWarning", "MissingFileError", "MissingKeyError", "available_cores", "commit_file",
    "digest", "downsample", "footprint_fraction", "interval_overlap", "eval_mode", "file_digest", "index_batches", "import_squidpy", "interactive", "lazy_exports", "progress_logger", "quiet_logger", "resize_patch", "resize_tile",
    "run_batches", "single_thread_worker", "spot_shape",
    "staged_file", "staged_folder", "staging_path", "thread_limits", "user_stacklevel", "warn",
]
