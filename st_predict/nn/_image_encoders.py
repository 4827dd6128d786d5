"""The image encoders (the trunk), one registered source each: the ResNet18, the lazyslide-models registry, Hugging
Face Hub ids, timm names and a user's :class:`torch.nn.Module`, registered the way lazyslide-models registers its
models (:func:`register_source`).

A source builds a backbone ``nn.Module`` (normalised ``(B, 3, S, S)`` -> ``(B, C, h, w)`` maps or ``(B, D)``
vectors) and its :class:`EncoderSpec`: everything the network needs to know about it (canonical name, trainable or
frozen by default, input size, normalisation, output width, how its weights come back on loading and their
digest). The spec is resolved once per model (``NH2ST.__init__``) and handed to the network; nothing else asks
which encoder it is. Pure torch; timm and lazyslide-models are imported only for their sources.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from st_predict._utils import InputError, MissingFileError, digest
from st_predict._utils import file_digest as _file_digest

from ._encoders import IMAGENET_MEAN, IMAGENET_STD, TRUNK_CHANNELS, build_resnet18_trunk, load_trunk_weights


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    """What the network needs to know about its image encoder, resolved once per model.

    Parameters
    ----------
    name
        Canonical name: ``"resnet18"``, ``"lazyslide:<key>"``, ``"hf-hub:<org>/<name>"``,
        ``"timm:<name>"`` or ``"module:<class>"``.
    input_size
        Side in pixels the encoder was trained at (``None``: any multiple of ``stride``, the ResNet18).
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
    source
        The registered source that built it (:data:`ENCODER_SOURCES`).
    trainable
        Whether it is fine-tuned by default (``trunk="finetune"``); the others default to ``trunk="frozen"``.
    stride
        Output stride of a map whose side follows the input (the ResNet18's 32: the input side must be a
        multiple of it); ``None`` for a fixed input size.
    channels_last
        Whether it runs faster on channels-last input (convolutions on CPU).
    inference_only
        Whether it runs in inference mode only (lazyslide-models cards): it cannot be fine-tuned.
    weights_digest
        A digest of the weights, computed once per weights file (``"file:<sha256>"``) or per published
        weights (``"state:<sha256>"``), for a rebuildable encoder; saved models check it on loading.
    rebuild_weights
        The weights file a rebuildable encoder was built from (``None``: its published weights).
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
    source: str = "module:"
    trainable: bool = False
    stride: int | None = None
    channels_last: bool = False
    inference_only: bool = False
    weights_digest: str | None = None
    rebuild_weights: str | None = None

    def map_size(self, image_size: int) -> int:
        """Side of the output map for ``image_size`` px patches (1 for a vector)."""
        if self.stride is not None:
            return image_size // self.stride
        return self.map_side if self.output == "map" else 1

    def check_image_size(self, image_size: int) -> None:
        """Refuse an input side the encoder cannot take, naming the one it takes."""
        if self.stride is not None and (image_size < self.stride or image_size % self.stride):
            raise InputError(f"image_size must be a positive multiple of {self.stride} for encoder {self.name!r}, "
                             f"got {image_size}.")
        if self.input_size is not None and image_size != self.input_size:
            raise InputError(
                f"image_size={image_size} but the encoder {self.name!r} takes {self.input_size} px patches; "
                f"leave image_size unset (it follows the encoder) or set it to {self.input_size}."
            )


#: the name it had before it held more than the encoder's input: kept for code that imported it
EncoderInfo = EncoderSpec

#: the registered encoder sources by name prefix (:func:`register_source`)
ENCODER_SOURCES: dict[str, EncoderSource] = {}
#: digests of published weights already computed in this process, by encoder name
_STATE_DIGESTS: dict[str, str] = {}


def register_source(cls):
    """Register an :class:`EncoderSource` subclass under its ``prefix`` (as lazyslide-models' ``register``)."""
    ENCODER_SOURCES[cls.prefix] = cls()
    return cls


class EncoderSource:
    """One way to get an image encoder: which names it owns, how it builds one and its spec, and where its
    blocks are (for ``finetune_blocks``)."""

    prefix: str = ""
    #: fine-tuned by default
    trainable: bool = False
    #: builds without any weights (random), as a network needs when its weights come from a saved model
    builds_offline: bool = False

    def owns(self, name: str) -> bool:
        return name == self.prefix or (self.prefix.endswith(":") and name.startswith(self.prefix))

    def build(self, name: str, weights, image_size: int | None, load_weights: bool) -> tuple[nn.Module, EncoderSpec]:
        raise NotImplementedError

    def blocks(self, trunk: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
        """The encoder's blocks in order, and what follows them (a ViT's final norm); ``([], [])`` if none."""
        if hasattr(trunk, "blocks") and isinstance(trunk.blocks, nn.Sequential | nn.ModuleList):
            norm = getattr(trunk, "norm", None)
            return list(trunk.blocks), [norm] if isinstance(norm, nn.Module) else []
        if all(hasattr(trunk, f"layer{i}") for i in range(1, 5)):  # a timm / torchvision ResNet
            return [getattr(trunk, f"layer{i}") for i in range(1, 5)], []
        return [], []


def source_of(name: str) -> EncoderSource:
    """The registered source of a canonical encoder name."""
    for src in ENCODER_SOURCES.values():
        if src.owns(name):
            return src
    raise InputError(f"No registered encoder source takes {name!r} (sources: {list(ENCODER_SOURCES)}).")


@register_source
class ResNet18Source(EncoderSource):
    """st_predict's ResNet18 trunk (torchvision's, without ``avgpool`` and ``fc``), trained end to end by default;
    weights: ``"imagenet"``, a file, a state dict or ``"random"`` (:func:`load_trunk_weights`)."""

    prefix = "resnet18"
    trainable = True
    builds_offline = True

    def build(self, name, weights, image_size, load_weights):
        net = build_resnet18_trunk()
        line = load_trunk_weights(net, weights) if load_weights else "from saved model"
        return net, EncoderSpec("resnet18", None, weights=line, source=self.prefix, trainable=True, stride=32,
                                channels_last=True)

    def blocks(self, trunk):
        return list(trunk.children())[4:], []  # conv1, bn1, relu, maxpool, then layer1..layer4


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

    def train(self, mode: bool = True):
        """As ``nn.Module.train``, except for a card whose model is a ``torch.export`` program (CTransPath's,
        Path2Space's): such a program cannot switch modes (it was exported in inference mode) and stays as it is."""
        if _is_exported(self.model):
            self.training = bool(mode)
            return self
        return super().train(mode)


def _is_exported(module: nn.Module) -> bool:
    """Whether ``module`` is the ``.module()`` of a ``torch.export`` program (which refuses ``train()``/``eval()``)."""
    try:
        module.train(module.training)
    except NotImplementedError:
        return True
    return False


class _PassThrough:
    """A card's own image processor that leaves st_predict's patches as they are: they come resized and
    normalised already (with the processor's own mean and std), so it must not rescale or normalise them a
    second time."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, images, **kwargs):
        off = {"do_resize": False, "do_center_crop": False, "do_rescale": False, "do_normalize": False}
        return self.processor(images=images, **{**kwargs, **off})


def _processor_size(processor) -> int | None:
    size = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    size = size or getattr(processor, "size", None)
    if size is not None and not isinstance(size, int | float):  # a dict, or transformers' SizeDict
        get = size.get if hasattr(size, "get") else (lambda key: getattr(size, key, None))
        size = get("height") or get("shortest_edge") or get("width")
    return int(size) if size else None


def _normalize_of(transform) -> tuple[tuple, tuple]:
    """Mean and std of the ``Normalize`` step of a torchvision transform (ImageNet's if it has none)."""
    steps = getattr(transform, "transforms", [transform])
    for step in steps:
        if type(step).__name__ == "Normalize":
            return tuple(map(float, step.mean)), tuple(map(float, step.std))
    return IMAGENET_MEAN, IMAGENET_STD


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


def _weights_digest(name: str, weights, net: nn.Module) -> str:
    """``"file:<sha256>"`` of a weights file (read once per process), else ``"state:<sha256>"`` of the published
    weights as loaded (computed once per encoder name and process)."""
    if weights is not None and weights != "random":
        return "file:" + _file_digest(weights)
    if name not in _STATE_DIGESTS:
        _STATE_DIGESTS[name] = "state:" + digest(net)
    return _STATE_DIGESTS[name]


@register_source
class RegistrySource(EncoderSource):
    """A vision model of the lazyslide-models registry (``"lazyslide:<key>"``), frozen and in inference mode.
    Its input size is the card's ``img_size``, else its own image processor's; its normalisation is its
    transform's or its processor's, applied once by st_predict (a card's processor is told not to normalise
    again)."""

    prefix = "lazyslide:"

    def build(self, name, weights, image_size, load_weights):
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
        processor = getattr(card, "img_processor", None)
        if processor is not None:
            mean = tuple(map(float, getattr(processor, "image_mean", IMAGENET_MEAN)))
            std = tuple(map(float, getattr(processor, "image_std", IMAGENET_STD)))
            card.img_processor = _PassThrough(processor)
        else:
            mean, std = _normalize_of(card.get_transform())
        size = getattr(card, "img_size", None)
        size = (size[0] if isinstance(size, tuple | list) else size) or (
            _processor_size(processor) if processor is not None else None) or 224
        net = _RegistryEncoder(card)
        net.eval()
        with torch.no_grad():
            x = (torch.zeros(1, 3, int(size), int(size)) - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(
                std).view(1, 3, 1, 1)
            dim = int(net(x).shape[-1])
        line = _weights_line(weights) if weights is not None else f"{key} published weights"
        return net, EncoderSpec(name, int(size), mean, std, dim, "vector", line, rebuildable=True, source=self.prefix,
                                inference_only=True, weights_digest=_weights_digest(name, weights, net))


def _timm_spec(net: nn.Module, name: str, weights: str, rebuildable: bool, source: str) -> EncoderSpec:
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(net)
    size = cfg["input_size"][-1]
    return EncoderSpec(name, int(size), tuple(map(float, cfg["mean"])), tuple(map(float, cfg["std"])),
                       int(net.num_features), "vector", weights, rebuildable, source=source)


@register_source
class TimmSource(EncoderSource):
    """A timm model (``"timm:<name>"``): its published weights, a local weights file or ``"random"``."""

    prefix = "timm:"

    def timm_name(self, name: str) -> str:
        return name.split(":", 1)[1]

    def build(self, name, weights, image_size, load_weights):
        import timm

        model_name = self.timm_name(name)
        if weights == "random":
            net = timm.create_model(model_name, pretrained=False, num_classes=0)
            return net.eval(), _timm_spec(net, name, "random init (no pretrained weights)", False, self.prefix)
        # "source" other than hf-hub: timm then loads the file, not the hub's weights
        overlay = {"file": os.fspath(weights), "source": "file"} if weights is not None else None
        net = timm.create_model(model_name, pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay)
        line = _weights_line(weights) if weights is not None else f"{model_name} published weights"
        spec = _timm_spec(net, name, line, True, self.prefix)
        return net.eval(), dataclasses.replace(spec, weights_digest=_weights_digest(name, weights, net))


@register_source
class HubSource(TimmSource):
    """A Hugging Face Hub id (``"hf-hub:<org>/<name>"``) loaded by timm, from the local HF cache when it is
    there (also with ``HF_HUB_OFFLINE=1``)."""

    prefix = "hf-hub:"

    def timm_name(self, name: str) -> str:
        return name  # timm reads the hub id with its prefix

    def build(self, name, weights, image_size, load_weights):
        net, spec = super().build(name, weights, image_size, load_weights)
        return net, dataclasses.replace(spec, source=self.prefix)


@register_source
class ModuleSource(EncoderSource):
    """A user's :class:`torch.nn.Module` (``"module:<class>"``): input size and normalisation from its timm config
    if it has one, else ``image_size`` (224) and ImageNet's; its output width from one forward pass. A module
    built by :func:`build_encoder` keeps its spec."""

    prefix = "module:"

    def build(self, name, weights, image_size, load_weights):
        raise InputError(f"encoder {name!r} is a user's module: give the module itself (encoder=<your module>).")

    def from_module(self, net: nn.Module, image_size: int | None) -> tuple[nn.Module, EncoderSpec]:
        spec = getattr(net, "st_predict_spec", None)
        if isinstance(spec, EncoderSpec):
            return net, spec
        name = encoder_name(net)
        if getattr(net, "pretrained_cfg", None) or getattr(net, "default_cfg", None):
            try:
                info = _timm_spec(net, name, "given module", False, self.prefix)
            except Exception:  # noqa: BLE001 - a partial config: fall back to the defaults
                info = None
            if info is not None:
                output, dim, side = _probe(net, info.input_size)
                return net, dataclasses.replace(info, output=output, out_channels=dim, map_side=side)
        size = image_size or 224
        output, dim, side = _probe(net, size)
        return net, EncoderSpec(name, size, IMAGENET_MEAN, IMAGENET_STD, dim, output, "given module", False, side,
                                source=self.prefix)


def encoder_name(encoder: str | nn.Module) -> str:
    """The canonical name of an encoder argument (a module: its spec's name if :func:`build_encoder` made it, else
    ``"module:<its class>"``)."""
    if isinstance(encoder, nn.Module):
        spec = getattr(encoder, "st_predict_spec", None)
        if isinstance(spec, EncoderSpec):
            return spec.name
        cls = type(encoder)
        return f"module:{cls.__module__}.{cls.__qualname__}"
    return canonical_name(encoder)


def canonical_name(encoder: str) -> str:
    """``"uni"`` -> ``"lazyslide:uni"``, ``"vit_small_patch16_224"`` -> ``"timm:..."``, ids with a
    prefix as they are. Refuses a name no source knows, listing what is accepted."""
    if not isinstance(encoder, str) or not encoder:
        raise InputError(f"encoder must be a name or a torch.nn.Module, got {encoder!r}.")
    if any(src.owns(encoder) for src in ENCODER_SOURCES.values()):
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


def _missing_weights_errors() -> tuple[type[BaseException], ...]:
    """What loading raises for weights that are not there or cannot be read: a missing or unreadable file, no
    network, a hub error (not a bug: those keep their traceback)."""
    errors: list[type[BaseException]] = [OSError, EOFError, pickle.UnpicklingError]
    try:
        from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

        errors += [HfHubHTTPError, HFValidationError, LocalEntryNotFoundError]
    except ImportError:  # pragma: no cover - huggingface_hub comes with timm
        pass
    try:
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def _unreadable_file(err: BaseException) -> bool:
    """torch's error for a truncated or corrupted checkpoint (a RuntimeError like any bug's)."""
    text = str(err)
    return isinstance(err, RuntimeError) and any(s in text for s in (
        "PytorchStreamReader", "zip archive", "invalid load key", "unexpected EOF", "Error(s) in loading state_dict"))


def build_encoder(
    encoder: str | nn.Module = "resnet18",
    weights: str | os.PathLike | Mapping | None = None,
    *,
    image_size: int | None = None,
    load_weights: bool = True,
) -> tuple[nn.Module, EncoderSpec]:
    """The backbone and its :class:`EncoderSpec`, from the registered source of ``encoder``.

    Weights that are missing or cannot be read (no file, no network, a hub error, a corrupted file) are a
    :class:`~st_predict.InputError` that says how to get them; any other error is a bug and keeps its
    traceback.

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
        return ENCODER_SOURCES["module:"].from_module(encoder, image_size)
    name = canonical_name(encoder)
    source = source_of(name)
    if not isinstance(source, ResNet18Source):
        if isinstance(weights, Mapping):
            raise InputError(f"encoder={name!r} takes encoder_weights as a file path, not a state dict.")
        if weights is not None and weights != "random":
            _check_file(weights, name)
    try:
        net, spec = source.build(name, weights, image_size, load_weights)
    except (InputError, MissingFileError):
        raise
    except ImportError as err:
        raise InputError(
            f"encoder {name!r} needs {err.name or 'a package that is not installed'}: pip install 'st-predict[wsi]' "
            "(timm, lazyslide-models)."
        ) from err
    except Exception as err:
        if not (isinstance(err, _missing_weights_errors()) or _unreadable_file(err)):
            raise  # a bug: its own traceback, not "missing weights"
        raise MissingFileError(
            f"Could not load encoder {name!r} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
            + _how_to_get(name)
        ) from err
    if spec.rebuildable and weights is not None and not isinstance(weights, Mapping):
        spec = dataclasses.replace(spec, rebuild_weights=os.fspath(weights))
    net.st_predict_spec = spec  # a module built here keeps its spec when it is given as encoder= again
    return net, spec


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
