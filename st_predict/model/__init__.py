"""scvi-tools models."""

from ._nh2st import NH2ST
from ._save_load import SAVE_FORMAT
from ._slide import default_num_workers

__all__ = ["NH2ST", "SAVE_FORMAT", "default_num_workers"]
