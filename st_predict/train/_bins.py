"""Lightning training plan of the sub-spot head: the trained network's trunk fixed, the head fitted to the spots'
measured counts through their footprints (pure Lightning + torch)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from st_predict.nn import apply_dihedral


class BinTrainingPlan(pl.LightningModule):
    """Optimises a :class:`~st_predict.module.BinModule` on batches ``{"patches", "counts", "library",
    "footprint"}`` (uint8 patches centred on the spots, their counts of the model's genes, their libraries and
    footprint index). Each patch and its footprint are flipped and rotated alike at random. Logs ``train_bin_nll`` per epoch; ``network`` (the trained
    :class:`~st_predict.module.NH2STModule`) only lends its trunk, in eval mode and without gradient."""

    def __init__(self, bins, network, lr: float = 1e-3, weight_decay: float = 0.0, augment: bool = True):
        super().__init__()
        self.bins = bins
        self.network = [network]  # not a submodule: its weights are neither trained nor saved with the plan
        self.lr, self.weight_decay, self.augment = float(lr), float(weight_decay), bool(augment)
        self.history: list[float] = []  # the mean loss of each epoch
        self._epoch: list[float] = []

    def on_fit_start(self) -> None:
        self.network[0].to(self.device).eval()

    def training_step(self, batch, batch_idx):
        patches, footprint = batch["patches"], self.bins.footprints[batch["footprint"]]
        if self.augment:  # the patch and its footprint turned alike
            codes = torch.randint(0, 8, (len(patches),))
            patches, footprint = apply_dihedral(patches, codes), apply_dihedral(footprint, codes)
        fine, final = self.bins.features(self.network[0], patches)
        rho = self.bins.rates(fine, final)
        loss = self.bins.loss(rho, batch["counts"], batch["library"], footprint=footprint)
        self.log("train_bin_nll", loss.detach(), on_step=False, on_epoch=True, batch_size=len(patches))
        self._epoch.append(float(loss.detach()))
        return loss

    def on_train_epoch_end(self) -> None:
        self.history.append(float(sum(self._epoch) / max(len(self._epoch), 1)))
        self._epoch = []

    def configure_optimizers(self):
        return torch.optim.AdamW(self.bins.parameters(), lr=self.lr, weight_decay=self.weight_decay)
