"""Lightning training plan for NH2ST: Adam + StepLR, logs every loss term (pure Lightning)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch


class NH2STTrainingPlan(pl.LightningModule):
    """Optimises :class:`~st_predict.module.NH2STModule` with Adam and a StepLR schedule (paper §3).

    Logs ``{train,validation}_{loss,mse,nce_query,nce_neighbor}`` once per epoch; scvi-tools'
    ``TrainRunner`` collects them into ``model.history``.

    Parameters
    ----------
    module
        The network.
    lr
        Adam learning rate (1e-4).
    weight_decay
        Adam weight decay.
    lr_step_size, lr_gamma
        StepLR: multiply the learning rate by ``lr_gamma`` every ``lr_step_size`` epochs (50, 0.9).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        lr_step_size: int = 50,
        lr_gamma: float = 0.9,
    ):
        super().__init__()
        self.module = module
        self.lr = lr
        self.weight_decay = weight_decay
        self.lr_step_size = lr_step_size
        self.lr_gamma = lr_gamma
        self.n_obs_training = None
        self.n_obs_validation = None
        self._sums: dict[str, tuple[torch.Tensor, int]] = {}
        self._names: list[str] = []

    def forward(self, batch):
        return self.module(batch)

    def _step(self, batch, prefix: str):
        terms = self.module.loss(batch)
        bs = batch["node_map"].shape[0]
        # accumulate batch-weighted sums here and log epoch means once per epoch (cheaper than
        # logging every step); under DDP the epoch means are averaged over processes
        stacked = torch.stack([v.detach() for v in terms.values()]) * bs
        total, n = self._sums.get(prefix, (0.0, 0))
        self._sums[prefix] = (total + stacked, n + bs)
        self._names = list(terms)
        return terms["loss"]

    def _log_epoch(self, prefix: str) -> None:
        if prefix not in self._sums:
            return
        sums, n = self._sums.pop(prefix)
        means = sums / n
        self.log_dict(
            {f"{prefix}_{name}": means[i] for i, name in enumerate(self._names)},
            on_step=False, on_epoch=True, sync_dist=True, batch_size=n,
        )

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("validation")

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "validation")

    def configure_optimizers(self):
        params = [p for p in self.module.parameters() if p.requires_grad]
        fused = all(p.device.type in ("cpu", "cuda") for p in params)
        optimizer = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay, fused=fused or None)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=self.lr_step_size, gamma=self.lr_gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
