"""Augmentations of uint8 RGB patches: flips and 90-degree rotations, and H&E stain jitter (pure torch)."""

from __future__ import annotations

import torch

from st_predict._utils import InputTypeError


def random_dihedral(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Apply one random flip/90-degree rotation (of the 8 dihedral ones) to each item of ``x``
    (``(U, C, H, W)``, acting on the last two axes)."""
    return apply_dihedral(x, torch.randint(0, 8, (x.shape[0],), generator=generator))


def apply_dihedral(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Item ``i`` of ``x`` (acting on its last two axes) flipped when ``codes[i] & 4`` and then rotated by
    ``codes[i] & 3`` quarter turns: the same codes move a patch and a map or footprint of it alike."""
    out = x.clone()
    for code in range(1, 8):
        sel = codes == code
        if not sel.any():
            continue
        t = x[sel]
        if code & 4:
            t = t.flip(-1)
        out[sel] = torch.rot90(t, int(code & 3), dims=(-2, -1))
    return out


def dihedral_views(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 flips/90-degree rotations of every item of ``x`` (``(U, C, H, W)``), identity first."""
    views = []
    for flip in (False, True):
        t = x.flip(-1) if flip else x
        views += [torch.rot90(t, k, dims=(-2, -1)) for k in range(4)]
    return views

# Ruifrok & Johnston's stain vectors (rows: haematoxylin, eosin, DAB) in optical density, as in
# scikit-image's ``skimage.color.rgb_from_hed``; its inverse maps optical densities to stain amounts.
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)


def stain_jitter(x: torch.Tensor, strength: float = 0.05, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random H&E stain and brightness variation of uint8 RGB patches ``(U, 3, H, W)``, per patch.

    Colour deconvolution into haematoxylin, eosin and DAB amounts (Ruifrok & Johnston), each amount
    scaled by ``U(1 - s, 1 + s)`` and shifted by ``U(-s, s)`` (Tellez et al., 2018, "HED jitter"),
    recomposed, then a brightness factor ``U(1 - s, 1 + s)``; ``s = strength``. ``strength=0``
    returns ``x`` unchanged.
    """
    if strength <= 0:
        return x
    if x.dtype != torch.uint8:
        raise InputTypeError(f"stain_jitter expects uint8 patches, got {x.dtype}.")
    n = x.shape[0]

    def uniform(*shape):
        return (2 * torch.rand(shape, generator=generator) - 1).to(x.device) * strength

    od = -torch.log((x.float() + 1.0) / 256.0)  # optical density
    hed_from_rgb = _HED_FROM_RGB.to(x.device, torch.float32)
    rgb_from_hed = _RGB_FROM_HED.to(x.device, torch.float32)
    stains = torch.einsum("uchw,cd->udhw", od, hed_from_rgb)
    stains = stains * (1 + uniform(n, 3, 1, 1)) + uniform(n, 3, 1, 1)
    od = torch.einsum("udhw,dc->uchw", stains, rgb_from_hed)
    rgb = (256.0 * torch.exp(-od) - 1.0) * (1 + uniform(n, 1, 1, 1))
    return rgb.round().clamp(0, 255).to(torch.uint8)
