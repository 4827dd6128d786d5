"""scvi-tools models."""

from ._nh2st import NH2ST

__all__ = ["NH2ST"]
