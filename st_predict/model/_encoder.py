"""The image encoder of an NH2ST model: chosen at construction, recorded, rebuilt on loading."""

from __future__ import annotations

import contextvars
import os
from collections.abc import Mapping

from torch import nn

from st_predict._utils import InputError, MissingFileError
from st_predict.dataloaders import state_digest
from st_predict.module import NetworkSettings
from st_predict.nn import EncoderInfo, build_encoder

#: What ``NH2ST.load(..., encoder=, encoder_weights=)`` was given, read by ``__init__`` while loading.
ENCODER_OVERRIDE: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "st_predict_encoder_override", default=None
)


def resolve_encoder(
    network: NetworkSettings,
    overrides: Mapping,
    encoder: str | nn.Module | None,
    encoder_weights,
    weights,
    loading: bool,
) -> tuple[NetworkSettings, tuple[nn.Module, EncoderInfo], str | None]:
    """The network settings completed for the encoder, the encoder, and the weights argument to save.

    A new model: ``encoder`` (default: the settings' ``encoder``) is built with ``encoder_weights``
    (the ResNet18 also takes ``weights``). Any encoder but the ResNet18 defaults to ``trunk="frozen"``
    and its own input size, unless those were given. While loading, the saved name and weights are
    used unless ``NH2ST.load`` was given others; a user module must be given again.
    """
    if loading:
        given = ENCODER_OVERRIDE.get() or {}
        name = network.encoder
        module = given.get("encoder")
        if name.startswith("module:"):
            if not isinstance(module, nn.Module):
                raise InputError(
                    f"This model was trained with a user encoder module ({name.split(':', 1)[1]}). Load it with "
                    "NH2ST.load(path, encoder=<an instance of that module>); its weights come from the saved model."
                )
            encoder = module
        else:
            encoder = name
        if given.get("encoder_weights") is not None:
            encoder_weights = given["encoder_weights"]
        try:
            net, info = build_encoder(encoder, encoder_weights, image_size=network.image_size, load_weights=False)
        except MissingFileError as err:
            raise MissingFileError(
                f"{err} This saved model needs encoder {name!r}; on another machine pass "
                "NH2ST.load(path, encoder_weights=PATH) (CLI: --encoder-weights)."
            ) from err
        return network, (net, info), encoder_weights
    if encoder is None:
        encoder = network.encoder
    if encoder_weights is None and not isinstance(weights, str | os.PathLike | Mapping) and weights is not None:
        raise InputError(f"weights must be a name, a path or a state dict, got {type(weights).__name__}.")
    is_resnet = isinstance(encoder, str) and encoder == "resnet18"
    if is_resnet:
        chosen = encoder_weights if encoder_weights is not None else weights
    else:
        chosen = encoder_weights
    size = overrides.get("image_size", network.image_size)
    net, info = build_encoder(encoder, chosen, image_size=size if isinstance(encoder, nn.Module) else None)
    changes = {"encoder": info.name}
    if info.input_size is not None and "image_size" not in overrides:
        changes["image_size"] = info.input_size
    if info.name != "resnet18" and "trunk" not in overrides:
        changes["trunk"] = "frozen"
    saved_weights = chosen
    if isinstance(chosen, Mapping):
        saved_weights = "state dict"  # its tensors are in the module
    elif chosen is not None:
        saved_weights = os.fspath(chosen)
    return network.replace(**changes), (net, info), saved_weights


def encoder_digest(module) -> str | None:
    """Digest of a rebuilt encoder's weights (``None`` when the weights are saved with the model)."""
    return None if module.saves_trunk else state_digest(module.trunk)


def check_encoder_digest(model) -> None:
    """After loading: a rebuilt encoder must have the weights the model was trained with."""
    want = getattr(model, "encoder_digest_", None)
    if want is None or model.module.saves_trunk:
        return
    have = state_digest(model.module.trunk)
    if have != want:
        raise InputError(
            f"The encoder {model.module.encoder_info.name!r} on this machine ({model.module.encoder_info.weights}) "
            f"has other weights (digest {have}) than the one this model was trained with (digest {want}). "
            "Pass the training weights with NH2ST.load(path, encoder_weights=PATH)."
        )
