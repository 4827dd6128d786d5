"""How NH2ST is trained (:meth:`~st_predict.NH2ST.train`), each setting with its default: the ``"default"``
recipe's (:data:`st_predict.model.RECIPES`). Pure Python, so the command line reads the defaults without
importing torch."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from st_predict._utils import InputError

#: ``TrainingSettings.optimizer`` values
OPTIMIZERS = ("adam", "adamw")
#: ``TrainingSettings.schedule`` values
SCHEDULES = ("onecycle", "step", "constant")
#: ``TrainingSettings.augment`` values (``True`` means ``"dihedral+stain"``, ``False`` ``"none"``)
AUGMENTATIONS = ("none", "dihedral", "dihedral+stain")
#: ``TrainingSettings.batches`` values
BATCHES = ("mixed", "section")
#: the settings that take ``None`` as a value (``validation=None``: train on every spot)
NONE_ALLOWED = ("validation",)


class _Recipe:
    """The default of :meth:`~st_predict.NH2ST.train`'s training settings: the recipe's value."""

    _instance = None

    def __new__(cls):
        cls._instance = cls._instance or super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "RECIPE"

    def __reduce__(self):
        return (_Recipe, ())


#: "the recipe's value": the default of each training setting of :meth:`~st_predict.NH2ST.train`
RECIPE = _Recipe()


@dataclass(frozen=True)
class TrainingSettings:
    """How NH2ST is trained (:meth:`~st_predict.NH2ST.train`); the defaults are the ``"default"``
    recipe's (:data:`st_predict.model.RECIPES`). Immutable: ``model.train(lr=3e-4)`` trains with
    ``dataclasses.replace(recipe_settings, lr=3e-4)``.

    Parameters
    ----------
    max_epochs
        Epochs.
    batch_size
        Target spots per batch; each brings its ``K`` neighbours. Must be >= 2 for the contrastive
        losses; the last incomplete training batch of an epoch is dropped.
    optimizer
        ``"adamw"`` or ``"adam"`` (the paper).
    lr
        Learning rate (the peak of the one-cycle schedule).
    weight_decay
        Weight decay (decoupled with AdamW, an L2 penalty with Adam).
    schedule
        ``"onecycle"``: linear warm-up over the first ``warmup`` fraction of the steps, then cosine
        annealing (:class:`torch.optim.lr_scheduler.OneCycleLR`, per step). ``"step"``: multiply the
        learning rate by ``lr_gamma`` every ``lr_step_size`` epochs (the paper: 50, 0.9).
        ``"constant"``.
    warmup
        Warm-up fraction of the one-cycle schedule.
    lr_step_size, lr_gamma
        The ``"step"`` schedule.
    augment
        ``"dihedral+stain"``: one random flip/90-degree rotation per patch and random H&E stain and
        brightness jitter; ``"dihedral"``: the flips/rotations only; ``"none"`` (``True``/``False``
        mean ``"dihedral+stain"``/``"none"``). See :class:`~st_predict.dataloaders.NH2STCollate`. A frozen
        trunk augments by caching the trunk maps of the 8 flips/rotations of each patch (stain jitter
        needs end-to-end training).
    validation
        ``None``: train on every spot. ``"section"``: hold out the last training section (an honest
        basis for choosing the epoch: its spots are not next to training spots); a section name or a
        list of them: hold those out. ``"random"``: random spots (one section only; leaky, and labelled
        so). The validation losses and ``validation_pcc`` are logged per epoch.
    best_epoch
        With a validation set: keep the weights of the epoch with the best ``validation_pcc``.
    precision
        Lightning's training precision, e.g. ``"32-true"`` or ``"bf16-mixed"``; ``"auto"``:
        ``"bf16-mixed"`` where the hardware computes in bfloat16 (CPUs with AVX512-BF16 or AMX, GPUs
        with bfloat16 support), else ``"32-true"``. Inference always runs in float32.
    batches
        ``"section"``: every training batch holds spots of one section
        (:class:`~st_predict.dataloaders.SectionBatchSampler`), so the contrastive negatives come from the
        same section and section-wide differences (stain, batch effects) cannot solve InfoNCE.
        ``"mixed"``: batches of random spots (the paper).
    center_sections
        Train on targets standardised within each section (each section's own mean and standard
        deviation per gene, mapped back onto the training spots' overall scale), so neither the MSE
        nor the contrastive terms spend capacity on between-section offsets that per-section
        correlation ignores and a new section does not share. Predictions stay on the data's scale.
    """

    max_epochs: int = 20
    batch_size: int = 32
    optimizer: Literal["adamw", "adam"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    schedule: Literal["onecycle", "step", "constant"] = "onecycle"
    warmup: float = 0.1
    lr_step_size: int = 50
    lr_gamma: float = 0.9
    augment: Literal["none", "dihedral", "dihedral+stain"] = "dihedral+stain"
    validation: str | tuple[str, ...] | None = None
    best_epoch: bool = False
    precision: str = "auto"
    batches: Literal["mixed", "section"] = "mixed"
    center_sections: bool = True

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if getattr(self, f.name) is None and f.name not in NONE_ALLOWED:
                raise InputError(f"{f.name}=None: this training setting needs a value (leave it out to keep the "
                                 f"recipe's, {f.default!r} by default).")
        augment = {True: "dihedral+stain", False: "none"}.get(self.augment, self.augment)
        object.__setattr__(self, "augment", augment)
        if isinstance(self.validation, list | tuple):
            object.__setattr__(self, "validation", tuple(str(v) for v in self.validation))
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"optimizer must be one of {list(OPTIMIZERS)}, got {self.optimizer!r}.")
        if self.schedule not in SCHEDULES:
            raise InputError(f"schedule must be one of {list(SCHEDULES)}, got {self.schedule!r}.")
        if self.augment not in AUGMENTATIONS:
            raise InputError(f"augment must be one of {list(AUGMENTATIONS)} (or True/False), got {self.augment!r}.")
        if self.batches not in BATCHES:
            raise InputError(f"batches must be one of {list(BATCHES)}, got {self.batches!r}.")
        if not 0 < self.warmup < 1:
            raise InputError(f"warmup must be a fraction in (0, 1), got {self.warmup}.")
        if not self.lr > 0:
            raise InputError(f"lr must be > 0, got {self.lr}.")
        if self.weight_decay < 0:
            raise InputError(f"weight_decay must be >= 0, got {self.weight_decay}.")
        if self.max_epochs < 0:
            raise InputError(f"max_epochs must be >= 0, got {self.max_epochs}.")
        if self.batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {self.batch_size}.")
        if self.lr_step_size < 1 or not self.lr_gamma > 0:
            raise InputError(
                f"lr_step_size must be >= 1 and lr_gamma > 0, got {self.lr_step_size} and {self.lr_gamma}."
            )

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The setting names, in order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **overrides) -> TrainingSettings:
        """A copy with ``overrides``, each taken as it is (``validation=None`` means no validation); a value of
        :data:`RECIPE` leaves its setting as it is. An unknown name is a ``TypeError`` that lists the settings."""
        unknown = sorted(set(overrides) - set(self.names()))
        if unknown:
            raise TypeError(f"Unknown training settings {unknown}; choose from {list(self.names())}.")
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not RECIPE})

    @classmethod
    def from_dict(cls, values: Mapping) -> TrainingSettings:
        """Settings from a mapping, unknown names refused."""
        return cls().replace(**values)

    def to_dict(self) -> dict:
        """The settings as a plain dict."""
        return dataclasses.asdict(self)
