"""Sub-spot bins (pure torch): the trunk's finer feature map, a head that turns it into per-gene densities on
that map's cells, the spot footprint on those cells, and count likelihoods for a spot's measured counts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from st_predict._utils import InputError

#: count likelihoods of the bin head
BIN_LOSSES = ("nb", "poisson")


def fine_and_final(trunk: nn.Module, x: torch.Tensor, stride: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass of a convolutional ``trunk`` (an ``nn.Sequential`` such as the ResNet18's) over normalised
    images ``x`` ``(B, 3, S, S)``: the fine map at ``stride`` and the final map. The fine map stacks, on the cells
    of ``stride`` pixels, the input's mean and SD per channel (the cell's own colour and texture) and every
    stage's map up to that stride, average-pooled onto the cells (a ResNet's layer1 and layer2 at 8):
    ``(B, C_f, S/stride, S/stride)``."""
    if not isinstance(trunk, nn.Sequential):
        raise InputError(f"Sub-spot bins read a convolutional trunk's intermediate maps; this encoder's trunk is a "
                         f"{type(trunk).__name__}, not an nn.Sequential of stages (use the ResNet18).")
    size = x.shape[-1]
    if size % stride:
        raise InputError(f"{size}-px patches do not divide into cells of {stride} px.")
    cells = size // stride
    mean = F.avg_pool2d(x, stride)
    parts = [mean, (F.avg_pool2d(x * x, stride) - mean * mean).clamp_min(0).sqrt()]
    for stage in trunk:
        x = stage(x)
        if x.ndim == 4 and x.shape[-1] >= cells and isinstance(stage, nn.Sequential):
            parts.append(F.adaptive_avg_pool2d(x, cells))
    if len(parts) < 3 or x.ndim != 4:
        raise InputError(f"The trunk has no stage map at stride {stride} or finer for {size}-px patches.")
    return torch.cat([p.float() for p in parts], 1), x


class BinHead(nn.Module):
    """Per-gene logits ``(B, n_genes, h, w)`` on the fine map's cells, from the fine map and the final map
    (upsampled bilinearly): each normalised (BatchNorm, no affine), a 1x1 convolution of each, summed, a hidden
    1x1 layer, and a zero-initialised 1x1 output (so training starts from a uniform density)."""

    def __init__(self, fine_channels: int, final_channels: int, n_genes: int, hidden: int = 128):
        super().__init__()
        self.norm_fine = nn.BatchNorm2d(fine_channels, affine=False)
        self.norm_final = nn.BatchNorm2d(final_channels, affine=False)
        self.fine = nn.Conv2d(fine_channels, hidden, 1)
        self.final = nn.Conv2d(final_channels, hidden, 1)
        self.hidden = nn.Sequential(nn.ReLU(), nn.Conv2d(hidden, hidden, 1), nn.ReLU())
        self.out = nn.Conv2d(hidden, n_genes, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, fine: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
        coarse = F.interpolate(self.final(self.norm_final(final.float())), size=fine.shape[-2:], mode="bilinear",
                               align_corners=False)
        return self.out(self.hidden(self.fine(self.norm_fine(fine.float())) + coarse))


def disc_weights(h: int, w: int, radius: float, supersample: int = 8, centres=None, square: bool = False) -> torch.Tensor:
    """``(h, w)``: the fraction of each cell of an ``h x w`` grid inside a disc of ``radius`` (in cells) at the
    grid's centre, or with ``centres`` (``(k, 2)`` offsets ``(x, y)`` from the grid's centre, in cells) inside the
    union of ``k`` such discs; by ``supersample x supersample`` points per cell. ``square``: axis-aligned squares
    of half-side ``radius`` in place of the discs (Visium HD's bins)."""
    if not radius > 0:
        raise InputError(f"The spot's radius (or half-side) must be positive, got {radius!r} cells.")
    t = (torch.arange(supersample, dtype=torch.float64) + 0.5) / supersample
    ys = (torch.arange(h, dtype=torch.float64)[:, None] + t[None, :]).reshape(-1) - h / 2
    xs = (torch.arange(w, dtype=torch.float64)[:, None] + t[None, :]).reshape(-1) - w / 2
    centres = torch.zeros(1, 2, dtype=torch.float64) if centres is None else torch.as_tensor(centres, dtype=torch.float64)
    if centres.ndim != 2 or centres.shape[1] != 2 or not torch.isfinite(centres).all():
        raise InputError(f"centres must be finite (k, 2) offsets, got shape {tuple(centres.shape)}.")
    inside = torch.zeros(len(ys), len(xs), dtype=torch.bool)
    for cx, cy in centres:
        if square:
            inside |= ((ys[:, None] - cy).abs() <= radius) & ((xs[None, :] - cx).abs() <= radius)
        else:
            inside |= ((ys[:, None] - cy) ** 2 + (xs[None, :] - cx) ** 2) <= radius**2
    return inside.reshape(h, supersample, w, supersample).double().mean((1, 3)).float()


def count_nll(counts: torch.Tensor, mean: torch.Tensor, loss: str = "nb", theta: torch.Tensor | None = None) -> torch.Tensor:
    """Elementwise negative log-likelihood of ``counts`` under a Poisson or negative binomial (NB2:
    ``Var = mean + mean^2 / theta``, ``theta`` per gene, the last axis) of ``mean``."""
    mean = mean.clamp_min(1e-8)
    if loss == "poisson":
        return mean - counts * torch.log(mean) + torch.lgamma(counts + 1)
    if loss != "nb":
        raise InputError(f"bin_loss must be one of {BIN_LOSSES}, got {loss!r}.")
    dtype = mean.dtype  # in float64: lgamma(x + theta) - lgamma(theta) cancels badly in float32 for a large theta
    counts, mean, theta = counts.double(), mean.double(), theta.double()
    log_theta_mu = torch.log(theta + mean)
    return -(torch.lgamma(counts + theta) - torch.lgamma(theta) - torch.lgamma(counts + 1)
             + theta * (torch.log(theta) - log_theta_mu) + counts * (torch.log(mean) - log_theta_mu)).to(dtype)
