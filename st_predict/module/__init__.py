"""The NH2ST network (pure torch: trainable without AnnData or scvi-tools)."""

from st_predict._settings import NetworkSettings

from ._nh2st_module import NH2STModule

__all__ = ["NH2STModule", "NetworkSettings"]
