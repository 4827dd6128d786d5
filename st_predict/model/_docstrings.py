"""Docstring sharing (docrep, as scvi-tools): the network's parameters are documented once, in
:class:`~st_predict.module.NH2STModule`, and reused by :class:`~st_predict.NH2ST`."""

from __future__ import annotations

import inspect

import docrep

from st_predict.module import NH2STModule

nh2st_dsp = docrep.DocstringProcessor()


def _module_parameters() -> str:
    """The Parameters section of :class:`NH2STModule`, without ``n_genes`` (the model sets it)."""
    nh2st_dsp.get_sections(inspect.cleandoc(NH2STModule.__doc__), "nh2st_module", ["Parameters"])
    text = nh2st_dsp.params["nh2st_module.parameters"]
    head, sep, rest = text.partition("\nlatent_dim\n")
    if not head.startswith("n_genes") or not sep:
        raise RuntimeError("NH2STModule's docstring must document n_genes, then latent_dim, first.")
    return "latent_dim\n" + rest


nh2st_dsp.params["nh2st_module.model_parameters"] = _module_parameters()
