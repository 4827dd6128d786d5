"""Contrastive loss (InfoNCE) used by both NH2ST branches."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from st_predict._utils import InputError


def info_nce(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    temperature: float = 0.05,
    symmetric: bool = False,
    gather: bool = False,
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
    gather
        Under ``torch.distributed`` (e.g. Lightning's DDP), compare each anchor with the other
        modality's rows of **every** process's batch (gathered with gradients), not only its own:
        ``world_size x B`` candidates instead of ``B``. All processes must have batches of the same size.
        Without an initialised process group it changes nothing.

    Returns
    -------
    Scalar loss.
    """
    if anchor.ndim != 2 or anchor.shape != positive.shape:
        raise InputError(
            f"info_nce expects two (B, D) tensors of the same shape, got {tuple(anchor.shape)} "
            f"and {tuple(positive.shape)}."
        )
    if anchor.shape[0] < 2:
        raise InputError(
            f"A contrastive loss needs at least 2 spots in a batch (one positive and one negative); "
            f"got a batch of {anchor.shape[0]}. Use batch_size >= 2 or contrastive=False."
        )
    if temperature <= 0:
        raise InputError(f"temperature must be > 0, got {temperature}.")
    a, p = F.normalize(anchor, dim=-1), F.normalize(positive, dim=-1)
    target = torch.arange(anchor.shape[0], device=anchor.device)
    if gather and _world_size() > 1:
        import torch.distributed as dist

        target = target + dist.get_rank() * anchor.shape[0]
        loss = F.cross_entropy(a @ _gather_with_grad(p).T / temperature, target)
        if symmetric:
            loss = 0.5 * (loss + F.cross_entropy(p @ _gather_with_grad(a).T / temperature, target))
        return loss
    logits = a @ p.T / temperature
    loss = F.cross_entropy(logits, target)
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(logits.T, target))
    return loss


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` from every process, in rank order; gradients flow back to each process's rows."""
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)
