"""The image encoder of an NH2ST model: chosen at construction, recorded, rebuilt on loading."""

from __future__ import annotations

import contextvars
import os
from collections.abc import Mapping

from torch import nn

from st_predict._utils import DEFAULT_WEIGHTS, InputError, MissingFileError
from st_predict.dataloaders import state_digest
from st_predict.module import NetworkSettings
from st_predict.nn import EncoderSpec, build_encoder, encoder_name, source_of

#: What ``NH2ST.load(..., encoder=, encoder_weights=)`` was given, read by ``__init__`` while loading.
ENCODER_OVERRIDE: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "st_predict_encoder_override", default=None
)


def resolve_encoder(
    network: NetworkSettings,
    overrides: Mapping,
    encoder: str | nn.Module | None,
    encoder_weights,
    loading: bool,
) -> tuple[tuple[nn.Module, EncoderSpec], dict, str | None]:
    """The encoder, built once with its weights, and its spec; the network settings it implies; the weights
    argument to save.

    A new model: ``encoder`` (default: the settings' ``encoder``) is built with ``encoder_weights`` (the
    ResNet18's default: ImageNet's). An encoder that is not trained by default (any but the ResNet18) defaults
    to ``trunk="frozen"``, and one with a fixed input size to that size, unless those were given. While loading,
    the saved name and weights are used unless ``NH2ST.load`` was given others; a user module must be given
    again."""
    name = network.encoder if encoder is None else encoder_name(encoder)
    if loading:
        given = ENCODER_OVERRIDE.get() or {}
        module = given.get("encoder")
        if name.startswith("module:") and not isinstance(module, nn.Module):
            raise InputError(
                f"This model was trained with a user encoder module ({name.split(':', 1)[1]}). Load it with "
                "NH2ST.load(path, encoder=<an instance of that module>); its weights come from the saved model."
            )
        if given.get("encoder_weights") is not None:
            encoder_weights = given["encoder_weights"]
        try:
            net, spec = build_encoder(module if name.startswith("module:") else name, encoder_weights,
                                      image_size=network.image_size, load_weights=False)
        except MissingFileError as err:
            raise MissingFileError(
                f"{err} This saved model needs encoder {name!r}; on another machine pass "
                "NH2ST.load(path, encoder_weights=PATH) (CLI: --encoder-weights)."
            ) from err
        return (net, spec), {}, encoder_weights
    if encoder_weights is not None and not isinstance(encoder_weights, str | os.PathLike | Mapping):
        raise InputError(f"encoder_weights must be a name, a path or a state dict, got {type(encoder_weights).__name__}.")
    if encoder_weights is None and source_of(name).trainable:
        encoder_weights = DEFAULT_WEIGHTS  # the ResNet18's published weights (ImageNet's)
    size = overrides.get("image_size", network.image_size)
    net, spec = build_encoder(encoder if encoder is not None else name, encoder_weights,
                              image_size=size if isinstance(encoder, nn.Module) else None)
    changes = {"encoder": spec.name}
    if spec.input_size is not None and "image_size" not in overrides:
        changes["image_size"] = spec.input_size
    if not spec.trainable and "trunk" not in overrides:
        changes["trunk"] = "frozen"
    saved = encoder_weights
    if isinstance(encoder_weights, Mapping):
        saved = "state dict"  # its tensors are in the module
    elif encoder_weights is not None:
        saved = os.fspath(encoder_weights)
    if spec.rebuild_weights is not None:
        saved = spec.rebuild_weights
    return (net, spec), changes, saved


def encoder_digest(module) -> str | None:
    """The digest of a rebuilt encoder's weights, computed once per weights file (``None`` when the weights are
    saved with the model)."""
    return None if module.saves_trunk else module.encoder_info.weights_digest


def check_encoder_digest(model) -> None:
    """After loading: a rebuilt encoder must have the weights the model was trained with."""
    want = getattr(model, "encoder_digest_", None)
    if want is None or model.module.saves_trunk:
        return
    spec = model.module.encoder_info
    if ":" not in want:  # saved before digests had a kind: a digest of the weights as loaded
        have = state_digest(model.module.trunk)
    else:  # "file:<sha>" of the weights file or "state:<sha>" of published weights, computed once per weights
        have = spec.weights_digest
        if want.startswith("state:") and not (have or "").startswith("state:"):
            have = "state:" + state_digest(model.module.trunk)
    if have != want:
        raise InputError(
            f"The encoder {spec.name!r} on this machine ({spec.weights}) has other weights (digest {have}) than "
            f"the one this model was trained with (digest {want}). Pass the training weights with "
            "NH2ST.load(path, encoder_weights=PATH)."
        )
