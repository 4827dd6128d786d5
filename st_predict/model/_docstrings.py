"""Docstring sharing (docrep, as scvi-tools): each setting is documented once, in
:class:`~st_predict.module.NetworkSettings` and :class:`~st_predict.train.TrainingSettings`, and reused
by :class:`~st_predict.NH2ST` and :meth:`~st_predict.NH2ST.train`."""

from __future__ import annotations

import inspect

import docrep

from st_predict.module import NetworkSettings
from st_predict.train import TrainingSettings

nh2st_dsp = docrep.DocstringProcessor()


def _parameters(cls, key: str) -> str:
    """The Parameters section of ``cls``'s docstring, indented to sit under a ``**kwargs`` entry (the
    placeholder is indented by 4 in the dedented docstring; the lines after the first follow it)."""
    nh2st_dsp.get_sections(inspect.cleandoc(cls.__doc__), key, ["Parameters"])
    return nh2st_dsp.params[f"{key}.parameters"].replace("\n", "\n    ")


nh2st_dsp.params["network_settings"] = _parameters(NetworkSettings, "network_settings")
nh2st_dsp.params["training_settings"] = _parameters(TrainingSettings, "training_settings")
