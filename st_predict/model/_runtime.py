"""Where and how NH2ST computes: device, training precision, and Lightning's chatter (filtered only
while training runs)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch


def _cpu_has_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX512-BF16 or AMX; Linux /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """Lightning precision for ``precision="auto"`` on ``device`` (see :class:`~st_predict.train.TrainingSettings`)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    return "bf16-mixed" if device.type == "cpu" and _cpu_has_bf16() else "32-true"


def check_accelerator(accelerator: str) -> None:
    """Refuse ``accelerator="gpu"`` (or ``"cuda"``) where no CUDA device is visible, in one line instead of
    Lightning's traceback."""
    if isinstance(accelerator, str) and accelerator.lower() in ("gpu", "cuda") and not torch.cuda.is_available():
        from st_predict._utils import InputError

        raise InputError(f"accelerator={accelerator!r}, but no CUDA device is visible to this process: use "
                         "accelerator='cpu' or accelerator='auto'.")


def device_for(accelerator: str) -> torch.device:
    """The device Lightning's ``accelerator`` puts the model on (CUDA for ``"auto"``/``"gpu"`` when present)."""
    check_accelerator(accelerator)
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


class _QuietLightning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING and "litlogger" not in record.getMessage()


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Inside the block, Lightning's rank-zero loggers pass warnings and errors only: not its
    "GPU available: False", "TPU available", "Using bfloat16 Automatic Mixed Precision", "`Trainer.fit`
    stopped" lines at every fit (the device and precision are in ``model.train_settings_``), nor its
    advertising tips. A filter on those loggers, removed on exit; their levels are left alone."""
    targets = [logging.getLogger(f"lightning.{part}.utilities.rank_zero") for part in ("pytorch", "fabric")]
    drop = _QuietLightning()
    for target in targets:
        target.addFilter(drop)
    try:
        yield
    finally:
        for target in targets:
            target.removeFilter(drop)
