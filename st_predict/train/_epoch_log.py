"""One line per training epoch, for output that is not a terminal (a log file, a batch job)."""

from __future__ import annotations

import time
from typing import TextIO

import lightning.pytorch as pl

from st_predict._utils import progress_logger

#: logged metrics shown in the line, with their labels, in this order
_SHOWN = (("train_loss", "loss"), ("train_mse", "MSE"), ("validation_loss", "validation loss"),
          ("validation_pcc", "validation PCC"))


class EpochLog(pl.Callback):
    """Write one line per finished epoch (to ``stream``, by default the ``st_predict.progress`` logger, which
    shows it on stdout): its number, the epoch means of the training loss and MSE, the
    validation loss and PCC when there is a validation set, and the time, e.g.::

        epoch 3/20  loss 1.8420  MSE 0.4711  validation PCC 0.2130  (6.1 s, 18.4 s in all)

    Written on rank 0 only, flushed at once, so that ``tail -f`` on a log file follows training. The
    training plan logs its epoch means after the callbacks' ``on_train_epoch_end``, so an epoch's line is
    written when the next epoch starts (or training ends).
    """

    def __init__(self, stream: TextIO | None = None):
        super().__init__()
        self.stream = stream
        self._start = self._epoch_start = None
        self._pending: int | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush(trainer)
        self._epoch_start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pending = trainer.current_epoch

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush(trainer)

    def _flush(self, trainer: pl.Trainer) -> None:
        if self._pending is None or not trainer.is_global_zero:
            self._pending = None
            return
        now = time.perf_counter()
        metrics = trainer.callback_metrics
        parts = [f"epoch {self._pending + 1}/{trainer.max_epochs}"]
        parts += [f"{label} {float(metrics[key]):.4f}" for key, label in _SHOWN if key in metrics]
        parts.append(f"({now - self._epoch_start:.1f} s, {now - self._start:.1f} s in all)")
        line = "  ".join(parts)
        if self.stream is None:
            progress_logger().info(line)
        else:
            self.stream.write(line + "\n")
            self.stream.flush()
        self._pending = None
