"""Lightning training plan for NH2ST: optimiser, schedule, neighbour cache, logging (pure Lightning)."""

from __future__ import annotations

import copy
import logging
import os
import random
import warnings
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import numpy as np
import torch
from torchmetrics.regression import PearsonCorrCoef

from st_predict._utils import InputError, commit_file, staging_path
from st_predict.train._config import TrainingSettings

logger = logging.getLogger(__name__)


def mean_gene_pcc(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Mean over genes of the Pearson correlation across spots (genes constant in either are skipped;
    NaN if all are)."""
    p = pred.double() - pred.double().mean(0)
    t = truth.double() - truth.double().mean(0)
    denom = p.norm(dim=0) * t.norm(dim=0)
    ok = denom > 0
    if not ok.any():
        return pred.new_tensor(float("nan"))
    return ((p * t).sum(0)[ok] / denom[ok]).mean().to(pred.dtype)


class NH2STTrainingPlan(pl.LightningModule):
    """Optimises :class:`~st_predict.module.NH2STModule`.

    Logs ``{train,validation}_{loss,mse,nce_query,nce_neighbor}`` once per epoch and
    ``validation_pcc`` (mean per-gene Pearson correlation of the predictions on the validation
    spots); scvi-tools' ``TrainRunner`` collects them into ``model.history``.

    Parameters
    ----------
    module
        The network.
    settings
        Optimiser and schedule: ``optimizer``, ``lr``, ``weight_decay``, ``schedule``, ``warmup``,
        ``lr_step_size`` and ``lr_gamma`` of :class:`~st_predict.train.TrainingSettings` (default: its
        defaults).
    neighbor_cache
        End-to-end training with cached neighbours: ``(n_spots, C, h, w)`` trunk maps of every spot,
        filled before training. Batches that carry ``"patch_rows"`` get their other rows from it, and
        every target's freshly computed maps are written back (no gradient), so each spot's entry is
        refreshed once per epoch at no extra trunk cost. Under DDP the fresh maps are gathered from
        every process first.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        settings: TrainingSettings | None = None,
        neighbor_cache: torch.Tensor | None = None,
        feature_cache: torch.Tensor | None = None,
        **overrides,
    ):
        super().__init__()
        self.settings = (settings or TrainingSettings()).replace(**overrides)
        self.module = module
        if feature_cache is not None:
            warnings.warn("NH2STTrainingPlan(feature_cache=) is deprecated: use neighbor_cache= (the on-disk feature "
                          "cache of train(feature_cache=) is another thing).", FutureWarning, stacklevel=2)
            neighbor_cache = feature_cache if neighbor_cache is None else neighbor_cache
        self.neighbor_cache = neighbor_cache
        self.n_obs_training = None
        self.n_obs_validation = None
        self._sums: dict[str, tuple[torch.Tensor, int]] = {}
        self._names: list[str] = []
        # the validation PCC from the moments of every process's predictions (torchmetrics syncs them under DDP):
        # the PCC of all validation spots, not a mean of per-process PCCs
        self.pcc_metric = PearsonCorrCoef(num_outputs=module.n_genes) if module.n_genes > 1 else PearsonCorrCoef()
        self._validation_seen = False

    def forward(self, batch):
        return self.module(batch)

    def on_fit_start(self) -> None:
        if self.neighbor_cache is not None:
            self.neighbor_cache = self.neighbor_cache.to(self.device)

    def on_fit_end(self) -> None:
        self.neighbor_cache = None  # only needed while training

    # the neighbour cache is training state: a resumed run must start from the one the checkpoint saw
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.neighbor_cache is not None:
            checkpoint["st_predict_neighbor_cache"] = self.neighbor_cache.detach().cpu()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # "st_predict_feature_cache": checkpoints written before the rename
        cache = checkpoint.get("st_predict_neighbor_cache", checkpoint.get("st_predict_feature_cache"))
        if cache is not None and self.neighbor_cache is not None:
            if cache.shape != self.neighbor_cache.shape:
                raise InputError(
                    f"The checkpoint's neighbour cache has shape {tuple(cache.shape)}, this training run's "
                    f"{tuple(self.neighbor_cache.shape)}: it comes from another model or data."
                )
            self.neighbor_cache = cache.to(self.neighbor_cache)

    def _step(self, batch, prefix: str):
        if "patch_rows" in batch and "fmaps" not in batch:
            if self.neighbor_cache is None:
                raise RuntimeError("A batch with cached neighbours needs the plan's neighbor_cache.")
            batch = {**batch, "fmaps": self.neighbor_cache[batch["node_index"]]}
        out = self.module(batch)
        if prefix == "train" and "live_fmaps" in out and self.neighbor_cache is not None and "patch_rows" in batch:
            self._refresh_cache(batch["node_index"][batch["patch_rows"]], out["live_fmaps"].detach())
        if prefix == "validation":
            pred, truth = out["prediction"].detach().float(), batch["expression"][:, 0].detach().float()
            self.pcc_metric.update(pred.squeeze(1) if pred.shape[1] == 1 else pred,
                                       truth.squeeze(1) if truth.shape[1] == 1 else truth)
            self._validation_seen = True
            out = {**out, "truth": truth}
        terms = {k: out[k] for k in ("loss", "mse", "nce_query", "nce_neighbor")}
        bs = batch["node_map"].shape[0]
        # accumulate batch-weighted sums here and log epoch means once per epoch (cheaper than
        # logging every step); under DDP the epoch means are averaged over processes
        stacked = torch.stack([v.detach() for v in terms.values()]) * bs
        total, n = self._sums.get(prefix, (0.0, 0))
        self._sums[prefix] = (total + stacked, n + bs)
        self._names = list(terms)
        if prefix == "validation":  # for callbacks: what the validation PCC is computed from
            return {"loss": terms["loss"], "prediction": out["prediction"].detach(), "truth": out["truth"]}
        return terms["loss"]

    @torch.no_grad()
    def _refresh_cache(self, ids: torch.Tensor, fmaps: torch.Tensor) -> None:
        if self.trainer is not None and self.trainer.world_size > 1:
            ids = self.all_gather(ids).flatten(0, 1)
            fmaps = self.all_gather(fmaps).flatten(0, 1)
        self.neighbor_cache[ids.to(self.neighbor_cache.device)] = fmaps.to(self.neighbor_cache)

    def _log_epoch(self, prefix: str) -> None:
        if prefix not in self._sums:
            return
        sums, n = self._sums.pop(prefix)
        means = sums / n
        metrics = {f"{prefix}_{name}": means[i] for i, name in enumerate(self._names)}
        self.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=True, batch_size=n)
        if prefix == "validation" and self._validation_seen:
            with warnings.catch_warnings():  # a gene constant on the validation spots has no PCC (NaN, skipped)
                warnings.filterwarnings("ignore", message=".*variance.*close to zero.*")
                per_gene = self.pcc_metric.compute()  # already over every process's spots
            per_gene = torch.atleast_1d(per_gene)
            pcc = per_gene[torch.isfinite(per_gene)].mean() if torch.isfinite(per_gene).any() else per_gene.new_tensor(
                float("nan"))
            self.log("validation_pcc", pcc, on_step=False, on_epoch=True, sync_dist=False, batch_size=n)
        if prefix == "validation":
            self.pcc_metric.reset()
            self._validation_seen = False

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("validation")

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        return self._step(batch, "validation")

    def configure_optimizers(self):
        params = [p for p in self.module.parameters() if p.requires_grad]
        fused = all(p.device.type in ("cpu", "cuda") for p in params) or None
        s = self.settings
        cls = torch.optim.AdamW if s.optimizer == "adamw" else torch.optim.Adam
        optimizer = cls(params, lr=s.lr, weight_decay=s.weight_decay, fused=fused)
        if s.schedule == "constant":
            return optimizer
        if s.schedule == "step":
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=s.lr_step_size, gamma=s.lr_gamma)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=s.lr, total_steps=total, pct_start=onecycle_warmup(s.warmup, total),
            anneal_strategy="cos",
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def onecycle_warmup(warmup: float, total_steps: int) -> float:
    """``pct_start`` for :class:`~torch.optim.lr_scheduler.OneCycleLR`: ``warmup``, except where the
    warm-up would be exactly one step (e.g. 0.1 of 10 steps), which makes torch divide by zero on the
    first step; there the warm-up phase ends just after step 0, the same schedule."""
    if abs(warmup * total_steps - 1.0) < 1e-9:
        return (1.0 + 1e-6) / total_steps
    return warmup


def _rng_states() -> dict:
    # plain tensors, ints and tuples only, so that Lightning's weights-only checkpoint loading accepts them
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "python": random.getstate(),
              "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class RNGStates(pl.Callback):
    """The random number generators of this process (torch, numpy, Python, CUDA) in every checkpoint, restored
    when training resumes from one: Lightning's checkpoints do not keep them, and without them a resumed run
    draws other augmentations and batches than the interrupted one would have."""

    def state_dict(self) -> dict:
        return {"rng": _rng_states()}

    def load_state_dict(self, state_dict: dict) -> None:
        if "rng" in state_dict:
            _set_rng_states(state_dict["rng"])


class EpochCheckpoint(pl.Callback):
    """Write a Lightning checkpoint of the whole training state (weights, optimiser, schedule, loops,
    callbacks) to ``dirpath/last.ckpt`` after every epoch, and to ``dirpath/best.ckpt`` when ``monitor``
    improves. Files are written next to their target and renamed into place, so a process killed while writing
    leaves the previous checkpoint. With :class:`RNGStates` among the callbacks (``NH2ST.train`` adds it), a run
    restarted from ``last.ckpt`` (``Trainer.fit(ckpt_path=...)``) restores the random number generators too, so
    on CPU it continues exactly as the interrupted run would have.

    Not Lightning's ``ModelCheckpoint``: through scvi-tools' ``Trainer`` enabling it also adds scvi-tools' own
    checkpoint callback (folders under ``scvi_log/``), and it writes ``last.ckpt`` only in epochs that also
    write a monitored checkpoint.
    """

    def __init__(self, dirpath: str | os.PathLike, monitor: str | None = None, mode: Literal["max", "min"] = "max"):
        super().__init__()
        self.dirpath = Path(dirpath)
        self.monitor, self.mode = monitor, mode
        self.best_score: float | None = None

    @property
    def last_path(self) -> Path:
        return self.dirpath / "last.ckpt"

    @property
    def best_path(self) -> Path:
        return self.dirpath / "best.ckpt"

    def state_dict(self) -> dict:
        return {"best_score": self.best_score}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best_score = state_dict.get("best_score")
        if "rng" in state_dict:  # checkpoints written before RNGStates kept them here
            _set_rng_states(state_dict["rng"])

    def _write(self, trainer: pl.Trainer, path: Path) -> None:
        staging = staging_path(path)  # one name for every rank: each takes part, rank 0 writes
        trainer.save_checkpoint(staging)
        trainer.strategy.barrier("st_predict_checkpoint")
        if trainer.is_global_zero:
            commit_file(staging, path)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
        improved = False
        if self.monitor is not None:
            value = trainer.callback_metrics.get(self.monitor)
            if value is not None and float(value) == float(value):
                value = float(value)
                improved = self.best_score is None or (
                    value > self.best_score if self.mode == "max" else value < self.best_score
                )
                if improved:
                    self.best_score = value
        self._write(trainer, self.last_path)
        if improved:
            self._write(trainer, self.best_path)


class BestEpoch(pl.Callback):
    """Keep the module's weights of the epoch with the best ``monitor`` (in memory) and restore them
    when training ends. :attr:`best_epoch` (1-based) and :attr:`best_score` say which it was."""

    def __init__(self, monitor: str = "validation_pcc", mode: Literal["max", "min"] = "max"):
        super().__init__()
        if mode not in ("max", "min"):
            raise InputError(f"mode must be 'max' or 'min', got {mode!r}.")
        self.monitor, self.mode = monitor, mode
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self._state: dict | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        value = float(value)
        if value != value:  # NaN: no usable score this epoch
            return
        better = self.best_score is None or (value > self.best_score if self.mode == "max" else value < self.best_score)
        if better:
            self.best_score, self.best_epoch = value, trainer.current_epoch + 1
            self._state = copy.deepcopy({k: v.detach().cpu() for k, v in pl_module.module.state_dict().items()})

    def state_dict(self) -> dict:
        return {"best_score": self.best_score, "best_epoch": self.best_epoch, "state": self._state}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best_score, self.best_epoch = state_dict.get("best_score"), state_dict.get("best_epoch")
        self._state = state_dict.get("state")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._state is not None:
            pl_module.module.load_state_dict(self._state)
            logger.info("Restored the weights of epoch %d (%s %.4f).", self.best_epoch, self.monitor, self.best_score)
