"""Encoders of NH2ST: the ResNet18 trunk, the pathology head, the ST encoder and the translator."""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from st_predict._utils import InputError, MissingFileError, digest, file_digest, progress_logger, warn

logger = logging.getLogger(__name__)
#: torch hub folders where this process failed to get torchvision's ImageNet weights (tried once per folder)
_IMAGENET_FAILED: dict[str, Exception] = {}

#: ImageNet channel statistics used to normalise patches for the ResNet18 trunk.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Output channels of the ResNet18 trunk.
TRUNK_CHANNELS = 512


def build_resnet18_trunk() -> nn.Sequential:
    """A randomly initialised torchvision ResNet18 without ``avgpool`` and ``fc``.

    Maps ``(B, 3, S, S)`` to ``(B, 512, S/32, S/32)`` (``7 x 7`` at 224 px).
    """
    from torchvision.models import resnet18

    net = resnet18(weights=None)
    return nn.Sequential(*list(net.children())[:-2]).to(memory_format=torch.channels_last)


def prepare_patches(patches: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 (or [0, 1] float) RGB patches ``(B, 3, S, S)`` -> normalised float32 (``(x - mean) /
    std``, ImageNet's by default) in channels-last memory format (the ResNet's convolutions run
    ~1.5x faster so on CPU)."""
    x = patches.float()
    if patches.dtype == torch.uint8:
        x = x / 255.0
    mean = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def _strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prefixes = ("module.", "model.", "resnet.", "backbone.", "encoder.", "trunk.", "net.")
    out = {}
    for key, value in state.items():
        k = key
        changed = True
        while changed:
            changed = False
            for p in prefixes:
                if k.startswith(p):
                    k = k[len(p) :]
                    changed = True
        out[k] = value
    return out


def _resnet_keys_to_trunk(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map torchvision ResNet18 key names (``conv1.weight``, ``layer1.0...``) onto the trunk's
    ``nn.Sequential`` indices (``0.weight``, ``4.0...``)."""
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    mapping = {n: str(i) for i, n in enumerate(names)}
    out = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head in mapping:
            out[f"{mapping[head]}.{rest}"] = value
        elif head.isdigit():
            out[key] = value
    return out


def load_trunk_weights(trunk: nn.Module, weights: str | os.PathLike | Mapping | None) -> str:
    """Load pretrained weights into a trunk from :func:`build_resnet18_trunk`.

    Parameters
    ----------
    trunk
        The trunk to fill.
    weights
        ``"imagenet"``: torchvision's ``ResNet18_Weights.IMAGENET1K_V1``, from the torch hub cache
        (``$TORCH_HOME/hub/checkpoints``) or downloaded; if neither works, the trunk stays random and
        a :class:`UserWarning` says so. A path: a state dict (``.pt``/``.pth``/``.ckpt``, optionally
        under a ``"state_dict"`` key, common prefixes such as ``module.`` or ``model.`` stripped),
        e.g. a histology self-supervised checkpoint. A state dict itself (a mapping of tensors, e.g.
        another trunk's ``state_dict()``). ``"random"`` or ``None``: random initialisation.

    Returns
    -------
    A one-line description of what was loaded, recorded in the model summary.
    """
    if weights is None or weights == "random":
        logger.warning("ResNet18 trunk is randomly initialised (encoder_weights='random').")
        return "random init (no pretrained weights)"
    if weights == "imagenet":
        from torchvision.models import ResNet18_Weights

        spec = ResNet18_Weights.IMAGENET1K_V1
        hub = torch.hub.get_dir()
        cached = os.path.join(hub, "checkpoints", os.path.basename(spec.url))
        if hub in _IMAGENET_FAILED and not os.path.exists(cached):
            # tried and failed in this process: not again (no second network timeout, no second warning)
            logger.info("ImageNet ResNet18 weights unavailable (see the first warning): random initialisation.")
            return "random init (ImageNet weights unavailable)"
        said = io.StringIO()
        try:
            with contextlib.redirect_stdout(said):  # torch.hub prints "Downloading: ..." before it knows it can
                state = spec.get_state_dict(progress=False)
        except Exception as err:  # noqa: BLE001 - any failure (offline, corrupt cache) -> loud fallback
            _IMAGENET_FAILED[hub] = err
            warn(
                "Could not load torchvision's ImageNet ResNet18 weights (IMAGENET1K_V1) from the torch "
                f"hub cache or the internet ({type(err).__name__}: {err}). The ResNet18 trunk is RANDOMLY "
                "INITIALISED: expect much weaker predictions, above all with trunk='frozen'. Put "
                "'resnet18-f37072fd.pth' in $TORCH_HOME/hub/checkpoints or pass encoder_weights='<file>'."
            )
            return "random init (ImageNet weights unavailable)"
        if said.getvalue().strip():
            progress_logger().info(said.getvalue().strip().replace("Downloading:", "Downloaded", 1))
        _load_resnet_state(trunk, state, source="torchvision IMAGENET1K_V1")
        return "torchvision ResNet18 IMAGENET1K_V1"
    if isinstance(weights, Mapping):
        _load_resnet_state(trunk, weights, source="the given state dict")
        return f"given state dict (sha256 {digest({k: v for k, v in weights.items() if isinstance(v, torch.Tensor)})[:12]})"
    path = Path(weights)
    if not path.is_file():
        raise MissingFileError(
            f"weights={str(weights)!r} is neither 'imagenet', 'random' nor an existing weights file."
        )
    obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise InputError(f"{path} does not hold a state dict (found {type(obj).__name__}).")
    _load_resnet_state(trunk, obj, source=str(path))
    return f"file {path.name} (sha256 {file_digest(path)[:12]})"


def _load_resnet_state(trunk: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    mapped = _resnet_keys_to_trunk(_strip_prefixes(state))
    own = trunk.state_dict()
    usable = {k: v for k, v in mapped.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in usable and not k.endswith("num_batches_tracked")]
    if not usable:
        raise InputError(f"No ResNet18 trunk weights found in {source}: none of its keys match.")
    if missing:
        raise InputError(
            f"{source} lacks {len(missing)} ResNet18 trunk tensors (e.g. {missing[:3]}); "
            "is it a ResNet18 checkpoint?"
        )
    trunk.load_state_dict(usable, strict=False)
    logger.info("Loaded ResNet18 trunk weights from %s", source)


class PathologyHead(nn.Module):
    """Projects a trunk feature map ``(B, C, h, w)`` to the latent vector ``h^p`` and, on demand, to
    ``h * w`` spatial tokens.

    ``pooling="flatten"`` (the authors' code): ``Linear(C*h*w -> N)`` on the flattened map.
    ``pooling="avg"``: global average, then ``Linear(C -> N)``.

    The pooled features are standardised before the projection. ``input_norm="fixed"`` (a frozen
    trunk): a fixed shift and scale fitted once on the training spots (:meth:`fit_input_scaling`)
    and saved with the model. ``input_norm="batch"`` (a trunk trained end to end): a
    :class:`~torch.nn.BatchNorm1d` without affine parameters, so the scaled features are ~0/1 in
    training mode whatever the trunk has learnt, and its running statistics are used at inference.
    """

    def __init__(
        self,
        map_size: int,
        latent_dim: int = 512,
        pooling: Literal["flatten", "avg"] = "flatten",
        in_channels: int = TRUNK_CHANNELS,
        with_tokens: bool = False,
        input_norm: Literal["fixed", "batch"] = "fixed",
    ):
        super().__init__()
        if pooling not in ("flatten", "avg"):
            raise InputError(f"pooling must be 'flatten' or 'avg', got {pooling!r}.")
        if input_norm not in ("fixed", "batch"):
            raise InputError(f"input_norm must be 'fixed' or 'batch', got {input_norm!r}.")
        self.pooling = pooling
        self.input_norm = input_norm
        in_features = in_channels * map_size * map_size if pooling == "flatten" else in_channels
        if input_norm == "fixed":
            # fixed standardisation of the pooled trunk features (see fit_input_scaling); saved with the model
            self.register_buffer("input_shift", torch.zeros(in_features))
            self.register_buffer("input_scale", torch.ones(in_features))
            self.register_buffer("input_fitted", torch.zeros((), dtype=torch.bool))
            self.batch_norm = None
        else:
            self.batch_norm = nn.BatchNorm1d(in_features, affine=False)
        self.proj = nn.Linear(in_features, latent_dim)
        if with_tokens:
            self.token_proj = nn.Linear(in_channels, latent_dim)
            self.token_pos = nn.Parameter(torch.zeros(1, map_size * map_size, latent_dim))
            nn.init.normal_(self.token_pos, std=0.02)
        else:
            self.token_proj = None

    def pool(self, fmap: torch.Tensor) -> torch.Tensor:
        """Pooled trunk features ``(B, C*h*w)`` (flatten) or ``(B, C)`` (avg), before standardisation."""
        return fmap.flatten(1) if self.pooling == "flatten" else fmap.mean((2, 3))

    def scaled(self, fmap: torch.Tensor) -> torch.Tensor:
        """Standardised pooled features (the projection's input)."""
        pooled = self.pool(fmap)
        if self.batch_norm is not None:
            return self.batch_norm(pooled)
        return (pooled - self.input_shift) * self.input_scale

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        """Latent vector ``(B, N)``."""
        return self.proj(self.scaled(fmap))

    @torch.no_grad()
    def fit_input_scaling(self, fmaps: torch.Tensor, eps: float = 1e-3) -> None:
        """Standardise each pooled feature to zero mean and unit variance over the given (training)
        feature maps: ``x -> (x - mean) / (std + eps)`` (``input_norm="fixed"`` only). Trunk features
        of a frozen (and above all a randomly initialised) ResNet have very unequal scales and large
        constant offsets; a fixed standardisation lets the projection learn from all of them."""
        if self.batch_norm is not None:
            raise RuntimeError("fit_input_scaling is for input_norm='fixed'; 'batch' standardises itself.")
        pooled = self.pool(fmaps.to(self.input_shift.device, torch.float32))
        self.input_shift.copy_(pooled.mean(0))
        self.input_scale.copy_(1.0 / (pooled.std(0) + eps))
        self.input_fitted.fill_(True)

    @property
    def needs_fit(self) -> bool:
        """``True`` while a fixed input standardisation has not been fitted yet."""
        return self.batch_norm is None and not bool(self.input_fitted)

    def tokens(self, fmap: torch.Tensor) -> torch.Tensor:
        """Spatial tokens ``(B, h*w, N)``."""
        if self.token_proj is None:
            raise RuntimeError("PathologyHead was built without tokens (with_tokens=False).")
        return self.token_proj(fmap.flatten(2).transpose(1, 2)) + self.token_pos


class Translator(nn.Sequential):
    """The translator ``phi_t``: latent ``N`` -> expression of ``n`` genes.

    ``hidden > 0``: ``Linear(N, hidden) -> activation -> dropout -> Linear(hidden, n)`` (the paper's
    two fully connected layers); ``hidden == 0``: one ``Linear(N, n)`` after dropout (a linear head,
    as ST-Net). :meth:`start_at` sets where training starts from.
    """

    def __init__(
        self,
        latent_dim: int,
        hidden: int,
        n_genes: int,
        activation: Literal["relu", "gelu", "none"] = "relu",
        dropout: float = 0.0,
    ):
        if hidden < 0:
            raise InputError(f"translator_hidden must be >= 0, got {hidden}.")
        if hidden == 0:
            super().__init__(nn.Dropout(dropout), nn.Linear(latent_dim, n_genes))
        else:
            super().__init__(*TwoLayerMLP(latent_dim, hidden, n_genes, activation, dropout))

    @torch.no_grad()
    def start_at(self, value: torch.Tensor, zero_weights: bool = False) -> None:
        """Make the last layer output ``value`` (its bias) and, with ``zero_weights``, nothing else:
        the model then starts as the per-gene mean predictor."""
        last = self[-1]
        last.bias.copy_(value.to(last.bias))
        if zero_weights:
            last.weight.zero_()


class TwoLayerMLP(nn.Sequential):
    """``Linear -> activation -> (dropout) -> Linear``: the ST encoder (``n -> N -> N``) and the
    translator (``N -> 256 -> n``). ``activation="none"`` reproduces the authors' code (no
    nonlinearity between the two layers)."""

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        activation: Literal["relu", "gelu", "none"] = "relu",
        dropout: float = 0.0,
    ):
        acts = {"relu": nn.ReLU, "gelu": nn.GELU, "none": nn.Identity}
        if activation not in acts:
            raise InputError(f"activation must be one of {sorted(acts)}, got {activation!r}.")
        super().__init__(
            nn.Linear(in_dim, hidden_dim), acts[activation](), nn.Dropout(dropout), nn.Linear(hidden_dim, out_dim)
        )


class GeneTokenizer(nn.Module):
    """Splits the ``n`` genes into ``n_tokens`` contiguous groups of near-equal size (sizes differ by at
    most one) and embeds each group with its own linear map: ``(B, n) -> (B, n_tokens, N)``. Gives the
    cross-attention something to attend over on the gene side (``attention_mode="tokens"``)."""

    def __init__(self, n_genes: int, n_tokens: int, latent_dim: int):
        super().__init__()
        if not 1 <= n_tokens <= n_genes:
            raise InputError(f"n_gene_tokens must be in [1, n_genes={n_genes}], got {n_tokens}.")
        self.n_tokens = n_tokens
        groups = torch.tensor_split(torch.arange(n_genes), n_tokens)
        self.group = max(len(g) for g in groups)
        # gene index per (token, slot); slot past a short group's end points at an appended zero column
        index = torch.full((n_tokens, self.group), n_genes, dtype=torch.long)
        for t, g in enumerate(groups):
            index[t, : len(g)] = g
        self.register_buffer("index", index, persistent=False)
        self.weight = nn.Parameter(torch.empty(n_tokens, self.group, latent_dim))
        self.bias = nn.Parameter(torch.zeros(n_tokens, latent_dim))
        nn.init.normal_(self.weight, std=self.group**-0.5)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """Gene tokens ``(B, n_tokens, N)``."""
        padded = torch.nn.functional.pad(y, (0, 1))
        groups = padded[:, self.index]  # (B, T, group)
        return torch.einsum("btg,tgd->btd", groups, self.weight) + self.bias
