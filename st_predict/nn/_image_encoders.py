"""Image encoders (the trunk) from four sources: the ResNet18, the lazyslide-models registry, timm /
Hugging Face Hub ids, and a user's :class:`torch.nn.Module`.

Each becomes a backbone ``nn.Module`` (normalised ``(B, 3, S, S)`` -> ``(B, C, h, w)`` maps or
``(B, D)`` vectors) and an :class:`EncoderInfo`: its canonical name, the input size and
normalisation it was trained with, its output width and where its weights came from. Pure torch;
timm and lazyslide-models are imported only for their sources.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from st_predict._utils import InputError, MissingFileError
from st_predict._utils import file_digest as _file_digest

from ._encoders import IMAGENET_MEAN, IMAGENET_STD, TRUNK_CHANNELS, build_resnet18_trunk, load_trunk_weights

#: Prefixes of the canonical encoder names.
SOURCES = ("resnet18", "lazyslide:", "hf-hub:", "timm:", "module:")


@dataclasses.dataclass(frozen=True)
class EncoderInfo:
    """What the network needs to know about its image encoder.

    Parameters
    ----------
    name
        Canonical name: ``"resnet18"``, ``"lazyslide:<key>"``, ``"hf-hub:<org>/<name>"``,
        ``"timm:<name>"`` or ``"module:<class>"``.
    input_size
        Side in pixels the encoder was trained at (``None``: any multiple of 32, the ResNet18).
    mean, std
        Channel normalisation of its input, on the ``[0, 1]`` scale.
    out_channels
        Width of its output (channels of a map, or the length of a vector).
    output
        ``"map"`` (``(B, C, h, w)``) or ``"vector"`` (``(B, D)``, used as a ``1 x 1`` map).
    weights
        One line on where the weights came from (shown in the model summary).
    rebuildable
        ``True`` when the weights come back from their name alone (a hub id, a registry key, a
        weights file): a saved model with a frozen encoder of this kind stores the name, not the
        weights, and rebuilds it on loading.
    map_side
        Side of a user module's output map (``output="map"``; the ResNet18's follows the input size).
    """

    name: str
    input_size: int | None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    out_channels: int = TRUNK_CHANNELS
    output: str = "map"
    weights: str = ""
    rebuildable: bool = False
    map_side: int = 1

    def map_size(self, image_size: int) -> int:
        """Side of the output map for ``image_size`` px patches (1 for a vector)."""
        if self.name == "resnet18":
            return image_size // 32
        return self.map_side if self.output == "map" else 1


RESNET18 = EncoderInfo("resnet18", None, weights="random init (no pretrained weights)")


class _RegistryEncoder(nn.Module):
    """A lazyslide-models vision model as a module: ``encode_image`` (the registry's own forward,
    e.g. class token plus mean patch token for Virchow) on normalised patches."""

    def __init__(self, card):
        super().__init__()
        self.model = card.model  # registered: moves with .to(), covered by state_dict()
        object.__setattr__(self, "_card", card)  # not a submodule: its model is registered above

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._card.encode_image(x)
        # the registry runs under inference_mode; a clone outside it is an ordinary tensor
        return out.clone() if out.is_inference() else out


def encoder_name(encoder: str | nn.Module) -> str:
    """The canonical name of an encoder argument (a module: ``"module:<its class>"``)."""
    if isinstance(encoder, nn.Module):
        cls = type(encoder)
        return f"module:{cls.__module__}.{cls.__qualname__}"
    return canonical_name(encoder)


def canonical_name(encoder: str) -> str:
    """``"uni"`` -> ``"lazyslide:uni"``, ``"vit_small_patch16_224"`` -> ``"timm:..."``, ids with a
    prefix as they are. Refuses a name no source knows, listing what is accepted."""
    if not isinstance(encoder, str) or not encoder:
        raise InputError(f"encoder must be a name or a torch.nn.Module, got {encoder!r}.")
    if encoder == "resnet18" or encoder.startswith(SOURCES[1:]):
        return encoder
    if encoder.startswith("hf_hub:"):
        return "hf-hub:" + encoder[len("hf_hub:") :]
    if encoder in registry_vision_keys():
        return f"lazyslide:{encoder}"
    try:
        import timm
    except ImportError:
        timm = None
    if timm is not None and timm.is_model(encoder):
        return f"timm:{encoder}"
    raise InputError(
        f"Unknown encoder {encoder!r}. Use 'resnet18', a lazyslide-models vision key "
        f"({', '.join(sorted(registry_vision_keys())[:8]) or 'pip install lazyslide-models'}, ...), a timm model name, "
        "'hf-hub:<org>/<name>', or a torch.nn.Module."
    )


def registry_vision_keys() -> dict[str, type]:
    """The vision models of the lazyslide-models registry (``{}`` when it is not installed)."""
    try:
        from lazyslide_models import MODEL_REGISTRY, ModelTask
    except ImportError:
        return {}

    def is_vision(cls) -> bool:
        task = cls.task if isinstance(cls.task, list) else [cls.task]
        return ModelTask.vision in task

    return {k: cls for k, cls in MODEL_REGISTRY.items() if is_vision(cls)}


def _weights_line(weights) -> str:
    path = Path(weights)
    return f"file {path.name} (sha256 {file_digest(path)})"


def file_digest(path: str | os.PathLike) -> str:
    """First 12 hex digits of a file's sha256 (read once per process)."""
    return _file_digest(path)[:12]


def _check_file(weights, name: str) -> None:
    if not Path(weights).is_file():
        raise MissingFileError(f"encoder_weights={str(weights)!r} for encoder {name!r} is not a file.")


def _how_to_get(name: str) -> str:
    if name.startswith("lazyslide:"):
        cls = registry_vision_keys().get(name.split(":", 1)[1])
        url = getattr(cls, "hf_url", None) or getattr(cls, "github_url", None)
        gated = " It is gated: accept its terms on that page and set HF_TOKEN (or run `hf auth login`)." if getattr(
            cls, "is_gated", False) else ""
        return (f"Download its weights once from {url or 'its model page'} (online) or pass encoder_weights= "
                f"with a local weights file.{gated}")
    if name.startswith("hf-hub:"):
        return ("Download it once online (it is then read from the Hugging Face cache, also with "
                "HF_HUB_OFFLINE=1), or pass encoder_weights= with a local weights file.")
    return "Pass encoder_weights= with a local weights file, or encoder_weights='random'."


def _timm_info(net: nn.Module, name: str, weights: str, rebuildable: bool) -> EncoderInfo:
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(net)
    size = cfg["input_size"][-1]
    return EncoderInfo(name, int(size), tuple(map(float, cfg["mean"])), tuple(map(float, cfg["std"])),
                       int(net.num_features), "vector", weights, rebuildable)


def _normalize_of(transform) -> tuple[tuple, tuple]:
    """Mean and std of the ``Normalize`` step of a torchvision transform (ImageNet's if it has none)."""
    steps = getattr(transform, "transforms", [transform])
    for step in steps:
        if type(step).__name__ == "Normalize":
            return tuple(map(float, step.mean)), tuple(map(float, step.std))
    return IMAGENET_MEAN, IMAGENET_STD


def build_encoder(
    encoder: str | nn.Module = "resnet18",
    weights: str | os.PathLike | Mapping | None = None,
    *,
    image_size: int | None = None,
    load_weights: bool = True,
) -> tuple[nn.Module, EncoderInfo]:
    """The backbone and its :class:`EncoderInfo`.

    Parameters
    ----------
    encoder
        ``"resnet18"``; a lazyslide-models vision key (``"uni"``, ``"h-optimus-0"``, ...; also as
        ``"lazyslide:<key>"``); a timm name (``"vit_small_patch16_224"``, ``"timm:<name>"``) or a
        Hugging Face Hub id (``"hf-hub:<org>/<name>"``, read from the local HF cache when
        ``HF_HUB_OFFLINE=1``); or a :class:`torch.nn.Module` mapping normalised patches to ``(B, D)``
        vectors or ``(B, C, h, w)`` maps.
    weights
        ResNet18: as :func:`load_trunk_weights` (``None``: random). Registry keys: a local
        weights file (their ``model_path``); ``None``: the published weights (download or HF cache;
        a gated model reads ``HF_TOKEN`` from the environment). timm names: a local weights file,
        ``"random"``, or ``None`` (the published weights). A user module: ignored (it comes with its
        weights).
    image_size
        Patch side for a user module that does not say its input size (default 224).
    load_weights
        ``False``: the ResNet18 stays random and a user module as it is (its weights come from a
        saved model). External encoders always load theirs.
    """
    if isinstance(encoder, nn.Module):
        return _module_encoder(encoder, image_size)
    name = canonical_name(encoder)
    if name == "resnet18":
        net = build_resnet18_trunk()
        line = "from saved model"
        if load_weights:
            line = load_trunk_weights(net, weights)
        return net, dataclasses.replace(RESNET18, weights=line)
    if isinstance(weights, Mapping):
        raise InputError(f"encoder={name!r} takes encoder_weights as a file path, not a state dict.")
    if weights is not None and weights != "random":
        _check_file(weights, name)
    try:
        if name.startswith("lazyslide:"):
            return _registry_encoder(name, weights)
        return _timm_encoder(name, weights)
    except (InputError, MissingFileError):
        raise
    except ImportError as err:
        raise InputError(
            f"encoder {name!r} needs {err.name or 'a package that is not installed'}: pip install 'st-predict[wsi]' "
            "(timm, lazyslide-models)."
        ) from err
    except Exception as err:
        raise MissingFileError(
            f"Could not load encoder {name!r} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
            + _how_to_get(name)
        ) from err


def _registry_encoder(name: str, weights) -> tuple[nn.Module, EncoderInfo]:
    key = name.split(":", 1)[1]
    cls = registry_vision_keys().get(key)
    if cls is None:
        raise InputError(f"{key!r} is not a vision model of the lazyslide-models registry (is it installed?).")
    if weights == "random":
        raise InputError(f"encoder={name!r}: registry models load their published or a local weights file, "
                         "not 'random'.")
    import inspect

    takes_path = "model_path" in inspect.signature(cls).parameters
    if weights is not None and not takes_path:
        raise InputError(f"The registry model {key!r} does not load a local weights file (no model_path); "
                         "leave encoder_weights unset to use its published weights.")
    card = cls(model_path=os.fspath(weights)) if weights is not None else cls()
    net = _RegistryEncoder(card)
    net.eval()
    mean, std = _normalize_of(card.get_transform())
    size = card.img_size[0] if isinstance(card.img_size, tuple | list) else int(card.img_size)
    with torch.no_grad():
        dim = int(net(torch.zeros(1, 3, size, size)).shape[-1])
    line = _weights_line(weights) if weights is not None else f"{key} published weights"
    return net, EncoderInfo(name, int(size), mean, std, dim, "vector", line, rebuildable=True)


def _timm_encoder(name: str, weights) -> tuple[nn.Module, EncoderInfo]:
    import timm

    model_name = name.split(":", 1)[1] if name.startswith("timm:") else name
    if weights == "random":
        net = timm.create_model(model_name, pretrained=False, num_classes=0)
        return net.eval(), _timm_info(net, name, "random init (no pretrained weights)", rebuildable=False)
    # "source" other than hf-hub: timm then loads the file, not the hub's weights
    overlay = {"file": os.fspath(weights), "source": "file"} if weights is not None else None
    net = timm.create_model(model_name, pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay)
    line = _weights_line(weights) if weights is not None else f"{model_name} published weights"
    return net.eval(), _timm_info(net, name, line, rebuildable=True)


def _module_encoder(net: nn.Module, image_size: int | None) -> tuple[nn.Module, EncoderInfo]:
    """A user's module: input size and normalisation from its timm config if it has one, else
    ``image_size`` (224) and ImageNet's; the output width from one forward pass."""
    name = encoder_name(net)
    if getattr(net, "pretrained_cfg", None) or getattr(net, "default_cfg", None):
        try:
            info = _timm_info(net, name, "given module", rebuildable=False)
        except Exception:  # noqa: BLE001 - a partial config: fall back to the defaults
            info = None
        if info is not None:
            output, dim, side = _probe(net, info.input_size)
            return net, dataclasses.replace(info, output=output, out_channels=dim, map_side=side)
    size = image_size or 224
    output, dim, side = _probe(net, size)
    return net, EncoderInfo(name, size, IMAGENET_MEAN, IMAGENET_STD, dim, output, "given module", False, side)


@torch.no_grad()
def _probe(net: nn.Module, size: int) -> tuple[str, int, int]:
    was = net.training
    net.eval()
    try:
        device = next(net.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    try:
        out = net(torch.zeros(2, 3, size, size, device=device))
    finally:
        net.train(was)
    if not isinstance(out, torch.Tensor) or out.ndim not in (2, 4):
        raise InputError(
            f"The encoder module must return a (B, D) or (B, C, h, w) tensor for (B, 3, {size}, {size}) patches; "
            f"got {type(out).__name__}{'' if not isinstance(out, torch.Tensor) else tuple(out.shape)}."
        )
    if out.ndim == 4 and out.shape[-1] != out.shape[-2]:
        raise InputError(f"The encoder module's maps must be square, got {tuple(out.shape[-2:])}.")
    return ("vector" if out.ndim == 2 else "map"), int(out.shape[1]), (int(out.shape[-1]) if out.ndim == 4 else 1)
