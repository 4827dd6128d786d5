"""The NH2ST network (pure torch: trainable without AnnData or scvi-tools) and its settings.

:class:`NetworkSettings` is pure Python (the command line reads it without torch); the network loads torch on
first use."""

from st_predict._utils import lazy_exports

from ._config import CONTEXTS, NetworkSettings

__getattr__, __dir__ = lazy_exports(__name__, {"NH2STModule": "._nh2st_module", "BinModule": "._bins"}, eager=globals())

__all__ = ["CONTEXTS", "BinModule", "NH2STModule", "NetworkSettings"]
