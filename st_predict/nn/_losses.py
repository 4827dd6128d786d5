"""Contrastive loss (InfoNCE) used by both NH2ST branches."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    temperature: float = 0.05,
    symmetric: bool = False,
) -> torch.Tensor:
    r"""InfoNCE between two batches of paired embeddings (NH2ST Eq. 2).

    Row ``i`` of ``anchor`` and row ``i`` of ``positive`` come from the same spot (the positive
    pair); every other row of ``positive`` is a negative for anchor ``i``. Similarities are cosine
    similarities divided by ``temperature``:

    .. math::
        \mathcal{L} = -\frac{1}{B}\sum_i \log
        \frac{\exp(s_{ii}/\tau)}{\sum_j \exp(s_{ij}/\tau)}

    Parameters
    ----------
    anchor
        ``(B, D)`` embeddings of the anchor modality (pathology in the paper).
    positive
        ``(B, D)`` embeddings of the other modality, row-aligned with ``anchor``.
    temperature
        Temperature :math:`\tau` (> 0).
    symmetric
        If ``True``, average the loss with pathology anchors and the loss with gene anchors
        (CLIP style). The paper's Eq. 2 is one-directional (``False``).

    Returns
    -------
    Scalar loss.
    """
    if anchor.ndim != 2 or anchor.shape != positive.shape:
        raise ValueError(
            f"info_nce expects two (B, D) tensors of the same shape, got {tuple(anchor.shape)} "
            f"and {tuple(positive.shape)}."
        )
    if anchor.shape[0] < 2:
        raise ValueError(
            f"A contrastive loss needs at least 2 spots in a batch (one positive and one negative); "
            f"got a batch of {anchor.shape[0]}. Use batch_size >= 2 or contrastive=False."
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    logits = F.normalize(anchor, dim=-1) @ F.normalize(positive, dim=-1).T / temperature
    target = torch.arange(anchor.shape[0], device=anchor.device)
    loss = F.cross_entropy(logits, target)
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(logits.T, target))
    return loss
