"""The sub-spot branch of NH2ST in pure torch: densities of each gene on the cells of the trunk's stride-8 map,
tied to a spot's measured counts through its footprint.

For a patch centred on spot ``s`` the head gives, on each cell ``b``, the density ``rho_bg`` of gene ``g`` as a
share of the spot's library per unit of area: ``rho_bg = share0_g * softplus(eta_bg + c)`` with
``softplus(c) = 1``, so a head at zero predicts every gene's mean share ``share0_g`` everywhere. The spot's counts
are the sum of its cells' rates, not a mean of logs: with ``w_sb`` the fraction of cell ``b`` inside the spot's
disc, its expected share is ``pi_sg = sum_b w_sb rho_bg / sum_b w_sb`` and its counts ``x_sg`` are negative
binomial (or Poisson) with mean ``L_s pi_sg`` (``L_s`` its library). On the package's scale a cell reads
``log1p(1e4 rho_bg)``: the counts per 10k a spot would have if all of it were like that cell."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from st_predict._utils import InputError
from st_predict.nn import BIN_LOSSES, BinHead, count_nll, fine_and_final, prepare_patches

#: ``softplus(SOFTPLUS_ONE) == 1``: a head at zero leaves each density at its start
SOFTPLUS_ONE = math.log(math.e - 1.0)


class BinModule(nn.Module):
    """Parameters
    ----------
    n_genes
        Genes (the NH2ST module's).
    fine_channels, final_channels
        Channels of the trunk's fine (stride ``stride``) and final maps.
    share0
        ``(n_genes,)`` each gene's mean share of the library on the training spots (the head's start).
    footprints
        ``(n_footprints, h, w)`` fraction of each cell inside a spot's disc (one per section's disc size).
    hidden, loss, stride
        The head's width, the count likelihood (``"nb"``, ``"poisson"``) and the fine map's stride.
    """

    def __init__(self, n_genes: int, fine_channels: int, final_channels: int, share0: torch.Tensor,
                 footprints: torch.Tensor, hidden: int = 128, loss: str = "nb", stride: int = 8):
        super().__init__()
        if loss not in BIN_LOSSES:
            raise InputError(f"bin_loss must be one of {BIN_LOSSES}, got {loss!r}.")
        if share0.shape != (n_genes,) or footprints.ndim != 3:
            raise InputError(f"share0 {tuple(share0.shape)} or footprints {tuple(footprints.shape)} do not fit "
                             f"{n_genes} genes and (n, h, w) discs.")
        self.loss_name, self.stride = loss, int(stride)
        self.head = BinHead(fine_channels, final_channels, n_genes, hidden)
        self.register_buffer("share0", share0.float().clamp_min(1e-12))
        self.register_buffer("footprints", footprints.float())
        # NB dispersion per gene, theta = exp(log_theta), starting at 10
        self.log_theta = nn.Parameter(torch.full((n_genes,), 2.302585))

    @property
    def map_size(self) -> tuple[int, int]:
        return tuple(self.footprints.shape[-2:])

    def features(self, network, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The fine and final maps of uint8 ``patches`` through ``network``'s trunk (an
        :class:`~st_predict.module.NH2STModule`), without gradient: the trunk is the trained network's, fixed."""
        info = network.encoder_info
        with torch.no_grad():
            return fine_and_final(network.trunk, prepare_patches(patches, info.mean, info.std), self.stride)

    def rates(self, fine: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
        """``(B, n_genes, h, w)`` densities ``rho`` (shares of the spot's library per unit of area)."""
        eta = self.head(fine, final)
        return self.share0[None, :, None, None] * F.softplus(eta + SOFTPLUS_ONE)

    def spot_share(self, rho: torch.Tensor, footprint: torch.Tensor) -> torch.Tensor:
        """``(B, n_genes)``: the spot's expected share of each gene, its cells' densities summed over the disc
        (``footprint`` ``(B, h, w)``) per unit of its area."""
        return (rho * footprint[:, None]).sum((-2, -1)) / footprint.sum((-2, -1))[:, None].clamp_min(1e-12)

    def loss(self, rho: torch.Tensor, counts: torch.Tensor, library: torch.Tensor,
             footprint_index: torch.Tensor | None = None, footprint: torch.Tensor | None = None) -> torch.Tensor:
        """Mean over spots and genes of the count likelihood's negative log-likelihood, each gene's term divided
        by its mean share times the mean library (so that a rare gene weighs as much as a common one). The
        spots' footprints: ``footprint`` ``(B, h, w)``, or rows ``footprint_index`` of :attr:`footprints`."""
        share = self.spot_share(rho, self.footprints[footprint_index] if footprint is None else footprint)
        mean = library[:, None] * share
        nll = count_nll(counts, mean, self.loss_name, self.log_theta.exp()[None, :])
        return (nll / (self.share0 * library.mean()).clamp_min(1.0)[None, :]).mean()
