"""What the peer baselines (TRIPLEX-, His2ST-, HisToGene- and EGN-style) share, and the rule they follow.

These are "-style" re-implementations, written after reading the authors' code, of methods whose
published recipes need a GPU (hundreds of epochs, 1024-wide stacks of 8-16 blocks, 224 px patches,
pathology foundation-model features). Every trained row of the benchmark table follows one CPU rule,
the same for every method, so that a row differs from another by its architecture and losses only:

1. **Images.** An image encoder that is trained sees the spot's patch (the runner's patch,
   ``_fold_patches(fold, adata, setup, 64)``) at 64 px. Where the authors' code reads pretrained frozen
   features (UNI, Ciga et al.'s self-supervised ResNet18), the peers read the runner's shared frozen
   trunk instead (here a randomly initialised ResNet18: no pretrained weights offline): ``fold.feats_*``
   for per-spot features, and the runner's encoder module ``fold.extra["trunk"]`` for anything else (e.g.
   TRIPLEX's neighbourhood tokens).
2. **Size.** At most 4 blocks per transformer stack and at most 512 wide (the authors' own numbers
   where smaller); their heads, head width, MLP ratios and dropout otherwise.
3. **Training**, the same for every trained row (NH2ST's default recipe, which the small-CNN and
   ST-Net rows follow): per-gene standardised targets (mean and sd of ``fold.y_train``, an sd below
   1e-6 replaced by 1, predictions mapped back; so no output clamp at >= 0, standardised targets being
   negative); AdamW (weight decay 1e-4) with a one-cycle schedule (``OneCycleLR``, 10 % warm-up) peaking
   at lr 1e-3, about 460 optimiser steps: methods that train on batches of spots run 20 epochs at batch
   32 (the last incomplete batch dropped), methods that train on a whole section per step run 100
   epochs (one section per step); augmentation: one random flip / 90-degree rotation per patch, no stain
   jitter. Each method keeps its OWN loss terms (not only MSE). What the authors used instead (their lr,
   epochs, batch, early stopping on the test fold...) is recorded in each class's docstring.
4. **Seeds.** ``torch.manual_seed(seed)`` and a seeded ``torch.Generator``; every class takes ``seed``
   and its sizes and epochs as constructor arguments.

Grid positions (HisToGene's and His2ST's position embeddings, TRIPLEX's APEG): per section, the spot
pitch is the median distance from a spot to the nearest other spot of the section, and a spot's grid
index is ``round((coord - section min) / pitch)``, clipped to ``[0, 63]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from anndata import AnnData
from torch import nn

from st_predict._utils import InputError

from ._methods import Fold

#: side of the patch a trained image encoder sees (rule 1)
IMAGE_SIZE = 64
#: one-cycle peak learning rate and AdamW weight decay (rule 3)
LR, WEIGHT_DECAY = 1e-3, 1e-4
#: grid positions are clipped to [0, GRID_SIZE - 1] (the position embeddings' table size)
GRID_SIZE = 64


# ---- targets, optimiser, training loop -------------------------------------------------------------


class TargetScale:
    """Per-gene standardisation of the training targets (an sd below 1e-6 replaced by 1)."""

    def __init__(self, y: np.ndarray):
        y = torch.as_tensor(np.asarray(y), dtype=torch.float32)
        self.mu = y.mean(0)
        sd = y.std(0) if len(y) > 1 else torch.ones_like(self.mu)
        self.sd = torch.where(sd > 1e-6, sd, torch.ones_like(sd))
        self.z = (y - self.mu) / self.sd

    def inverse(self, z: torch.Tensor) -> np.ndarray:
        return (z.detach().float() * self.sd + self.mu).numpy()


def spot_batches(n: int, batch_size: int, epochs: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Index batches of ``epochs`` shuffled passes over ``n`` spots, the last incomplete batch dropped."""
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise InputError(f"{n} training spots are fewer than one batch of {batch_size}: lower batch_size.")
    out = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        out += [perm[s * batch_size : (s + 1) * batch_size] for s in range(per_epoch)]
    return out


def section_steps(n_sections: int, epochs: int, gen: torch.Generator) -> list[int]:
    """One step per section, ``epochs`` shuffled passes over the sections."""
    return [int(i) for _ in range(epochs) for i in torch.randperm(n_sections, generator=gen)]


def train_steps(
    model: nn.Module,
    steps: Sequence,
    loss_fn: Callable[[object], torch.Tensor],
    lr: float = LR,
    weight_decay: float = WEIGHT_DECAY,
) -> None:
    """AdamW with a one-cycle schedule (10 % warm-up, peak ``lr``), one optimiser step per item of
    ``steps`` (``loss_fn(item)`` gives its loss); leaves the model in eval mode."""
    if len(steps) == 0:
        raise InputError("No training steps: epochs must be at least 1.")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=len(steps), pct_start=0.1)
    model.train()
    for item in steps:
        loss = loss_fn(item)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()


def dihedral(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One random flip / 90-degree rotation (of the 8) per patch of ``x`` ``(n, C, H, W)``."""
    codes = torch.randint(0, 8, (len(x),), generator=gen)
    out = x.clone()
    for code in range(1, 8):
        sel = codes == code
        if sel.any():
            t = x[sel].flip(-1) if code & 4 else x[sel]
            out[sel] = torch.rot90(t, code & 3, dims=(-2, -1))
    return out


# ---- fold helpers: patches, coordinates, grid positions, counts ------------------------------------


def fold_spots(fold: Fold, adata: AnnData) -> tuple[np.ndarray, np.ndarray]:
    """Full-resolution ``(x, y)`` coordinates and section of every spot of ``adata``."""
    from st_predict.pp import spot_coordinates, spot_libraries

    setup = fold.extra["setup"]
    return spot_coordinates(adata, setup["spatial_key"]), spot_libraries(adata, setup["library_key"])


def section_pitch(coords: np.ndarray, libraries: np.ndarray) -> dict[str, float]:
    """Median distance from a spot to the nearest other spot, per section."""
    from scipy.spatial import cKDTree

    out = {}
    for lib in pd.unique(libraries):
        xy = coords[libraries == lib]
        if len(xy) < 2:
            raise InputError(
                f"Section {lib!r} has {len(xy)} spot(s): a spot grid needs at least 2 spots per section."
            )
        d, _ = cKDTree(xy).query(xy, k=2)
        pitch = float(np.median(d[:, 1]))
        if not pitch > 0:
            raise InputError(
                f"Section {lib!r}: most spots share their coordinates with another spot (pitch 0)."
            )
        out[str(lib)] = pitch
    return out


def grid_positions(coords: np.ndarray, libraries: np.ndarray) -> np.ndarray:
    """``(n, 2)`` integer ``(column, row)`` grid index of every spot (module docstring), in
    ``[0, GRID_SIZE - 1]``."""
    pitch = section_pitch(coords, libraries)
    out = np.zeros((len(coords), 2), dtype=np.int64)
    for lib, p in pitch.items():
        sel = libraries == lib
        xy = coords[sel]
        out[sel] = np.clip(np.rint((xy - xy.min(0)) / p), 0, GRID_SIZE - 1).astype(np.int64)
    return out


def sections_of(libraries: np.ndarray) -> list[np.ndarray]:
    """Row indices of each section, in order of appearance."""
    return [np.flatnonzero(libraries == lib) for lib in pd.unique(libraries)]


def raw_counts(adata: AnnData, genes: Sequence[str]) -> torch.Tensor:
    """Raw counts ``(n_obs, n_genes)`` of ``genes`` (``adata.X``)."""
    import scipy.sparse as sp

    idx = adata.var_names.get_indexer(list(genes))
    if (idx < 0).any():
        raise InputError(
            f"Genes {[g for g, i in zip(genes, idx, strict=True) if i < 0][:5]} are not in the data."
        )
    x = adata.X[:, idx]
    x = x.toarray() if sp.issparse(x) else np.asarray(x)
    return torch.as_tensor(x, dtype=torch.float32)


def frozen_trunk(fold: Fold) -> nn.Module:
    """The runner's frozen encoder (eval mode, no gradients), which must give maps whose side follows the input
    (a CNN such as the ResNet18): the peers read it over regions larger than a patch."""
    trunk, spec = fold.extra.get("trunk"), fold.extra.get("encoder_spec")
    if trunk is None or spec is None or spec.stride is None:
        raise InputError(
            "This method reads the runner's frozen encoder over whole neighbourhoods, which needs a convolutional "
            f"encoder whose maps follow the input size (the ResNet18); the runner's is {getattr(spec, 'name', None)!r}."
        )
    trunk.eval()
    return trunk


def _uint8_rgb(arr) -> np.ndarray:
    arr = np.asarray(arr.compute(scheduler="synchronous") if hasattr(arr, "compute") else arr)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    arr = arr[..., :3]
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.floating) and np.nanmax(arr) <= 1.0 + 1e-6:
        arr = arr * 255.0
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


class RegionReader:
    """The ``grid x grid`` patch-sized sub-patches centred on each spot of ``adata``, as one region.

    The patch side is resolved as :func:`~st_predict.benchmark._methods._fold_patches` does, so the
    central sub-patch is the spot's own patch. Parts of a region outside its image are white (255) and
    a sub-patch not fully inside the image is masked. Only the pixels under a region are read from a
    lazy (dask) image, except one stored as a single block (a JPEG), which is decoded once per section.
    """

    def __init__(self, fold: Fold, adata: AnnData, out_size: int, grid: int = 5):
        from st_predict.pp import section_images

        from ._methods import fold_geometry

        setup = fold.extra["setup"]
        coords, self.libs = fold_spots(fold, adata)
        geometry = fold_geometry(fold)
        self.images, scales = section_images(adata, self.libs, setup["image_key"])
        sides = geometry.pixels_for(adata, self.libs)
        self.out_size, self.grid = out_size, grid
        self.side = np.zeros(adata.n_obs, dtype=np.int64)
        self.origin = np.zeros((adata.n_obs, 2), dtype=np.int64)  # (x0, y0) of each region in image pixels
        for lib in pd.unique(self.libs):
            sel = self.libs == lib
            side = max(int(round(sides[lib] * scales[lib])), 1)
            cxy = coords[sel] * scales[lib]
            self.side[sel] = side
            self.origin[sel] = np.floor(cxy - side / 2.0 + 0.5).astype(np.int64) - (grid // 2) * side
        self._decoded: tuple[str, np.ndarray] | None = None

    def _image(self, lib: str):
        img = self.images[lib]
        if hasattr(img, "compute") and getattr(img, "npartitions", None) != 1:
            return img
        if self._decoded is None or self._decoded[0] != lib:
            self._decoded = None
            self._decoded = (lib, _uint8_rgb(img))
        return self._decoded[1]

    def read(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 regions ``(len(rows), 3, grid * out_size, grid * out_size)`` and their sub-patch masks
        ``(len(rows), grid * grid)`` (row-major; ``True``: the sub-patch is fully inside the image)."""
        g, size = self.grid, self.grid * self.out_size
        out = torch.empty((len(rows), 3, size, size), dtype=torch.uint8)
        mask = torch.ones((len(rows), g * g), dtype=torch.bool)
        for k, i in enumerate(np.asarray(rows, dtype=np.int64)):
            img = self._image(self.libs[i])
            h, w = img.shape[:2]
            side, (x0, y0) = int(self.side[i]), self.origin[i]
            full = g * side
            region = np.full((full, full, 3), 255, dtype=np.uint8)
            ya, yb, xa, xb = max(y0, 0), min(y0 + full, h), max(x0, 0), min(x0 + full, w)
            if yb > ya and xb > xa:
                region[ya - y0 : yb - y0, xa - x0 : xb - x0] = _uint8_rgb(img[ya:yb, xa:xb])
            starts = np.arange(g) * side
            inside_y = (y0 + starts >= 0) & (y0 + starts + side <= h)
            inside_x = (x0 + starts >= 0) & (x0 + starts + side <= w)
            mask[k] = torch.from_numpy((inside_y[:, None] & inside_x[None, :]).reshape(-1))
            t = torch.from_numpy(region).permute(2, 0, 1)
            if full != size:
                t = (
                    F.interpolate(
                        t[None].float(),
                        size=(size, size),
                        mode="bilinear",
                        antialias=True,
                        align_corners=False,
                    )[0]
                    .round()
                    .clamp(0, 255)
                    .to(torch.uint8)
                )
            out[k] = t
        return out, mask


# ---- transformer blocks ----------------------------------------------------------------------------


def _key_bias(mask: torch.Tensor | None, bias: torch.Tensor | None, dtype) -> torch.Tensor | None:
    """Additive attention bias from a key mask ``(B, Nk)`` (``True``: attend) and a ``(h, Nq, Nk)`` bias."""
    if mask is None:
        return bias
    fill = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(torch.float16).min)
    fill = fill[:, None, None, :]
    return fill if bias is None else fill + bias[None]


class Attention(nn.Module):
    """Multi-head attention (no bias in the q/k/v projections, as theirs); self-attention when
    ``context`` is ``None``. ``grid``: a learned relative-position bias per head over a
    ``grid x grid`` token grid, indexed by ``(|drow|, |dcol|)`` (TRIPLEX's neighbour encoder)."""

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float = 0.0, grid: int | None = None):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = (
            nn.Identity()
            if heads == 1 and dim_head == dim
            else nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))
        )
        self.grid = grid
        if grid is not None:
            r, c = np.divmod(np.arange(grid * grid), grid)
            offset = np.abs(r[:, None] - r[None, :]) * grid + np.abs(c[:, None] - c[None, :])
            self.rel_bias = nn.Parameter(torch.zeros(heads, grid * grid))
            self.register_buffer("rel_index", torch.as_tensor(offset, dtype=torch.long), persistent=False)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(*t.shape[:2], self.heads, self.dim_head).transpose(1, 2)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        context = x if context is None else context
        q = self._split(self.to_q(x))
        k, v = (self._split(t) for t in self.to_kv(context).chunk(2, dim=-1))
        bias = self.rel_bias[:, self.rel_index] if self.grid is not None else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=_key_bias(mask, bias, q.dtype))
        return self.to_out(out.transpose(1, 2).reshape(*x.shape[:2], -1))


def feed_forward(dim: int, hidden: int, dropout: float = 0.0) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
    )


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + ff(norm(x))``."""

    def __init__(
        self, dim: int, heads: int, dim_head: int, mlp_dim: int, dropout: float = 0.0, grid: int | None = None
    ):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dim_head, dropout, grid)
        self.ff = feed_forward(dim, mlp_dim, dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attn(self.norm1(x), mask=mask) + x
        return self.ff(self.norm2(x)) + x


class Stack(nn.Module):
    """``depth`` :class:`Block` s."""

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        dim_head: int,
        mlp_dim: int,
        dropout: float = 0.0,
        grid: int | None = None,
    ):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads, dim_head, mlp_dim, dropout, grid) for _ in range(depth))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, mask)
        return x


class CrossBlock(nn.Module):
    """Pre-norm cross-attention block (TRIPLEX's fusion): the query and the key/value tokens pass the
    same LayerNorm, ``q + attn(norm(q), norm(kv))``, then ``q + ff(norm(q))``."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dim // heads, dropout)
        self.ff = feed_forward(dim, mlp_dim, dropout)

    def forward(self, q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q = self.attn(self.norm1(q), self.norm1(kv), mask) + q
        return self.ff(self.norm2(q)) + q


def check_dims(dim: int, heads: int, what: str) -> None:
    if dim % heads:
        raise InputError(f"{what}: width {dim} is not a multiple of {heads} heads.")


def check_positive(**values: float) -> None:
    bad = {k: v for k, v in values.items() if not (isinstance(v, int | float) and v > 0 and math.isfinite(v))}
    if bad:
        raise InputError(f"These settings must be positive: {bad}.")
