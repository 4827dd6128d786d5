"""The NH2ST network (pure torch: trainable without AnnData or scvi-tools)."""

from ._nh2st_module import NH2STModule

__all__ = ["NH2STModule"]
