"""Named training recipes of NH2ST: the settings of the network and of its training, in one place."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    """A named set of :class:`~st_predict.module.NH2STModule` keywords (:attr:`model`) and
    :meth:`~st_predict.NH2ST.train` keywords (:attr:`train`; ``tta`` is the prediction default).
    Arguments given explicitly override it. Immutable (and picklable, so a saved model keeps it)."""

    name: str
    description: str
    model_items: tuple = ()
    train_items: tuple = ()

    @classmethod
    def make(cls, name: str, description: str, model: dict | None = None, train: dict | None = None) -> Recipe:
        """A recipe from two dicts of settings."""
        return cls(name, description, tuple(sorted((model or {}).items())), tuple(sorted((train or {}).items())))

    @property
    def model(self) -> dict:
        """Network settings (a copy)."""
        return dict(self.model_items)

    @property
    def train(self) -> dict:
        """Training settings (a copy)."""
        return dict(self.train_items)


def _recipe(name: str, description: str, model: dict, train: dict) -> Recipe:
    return Recipe.make(name, description, model, train)


#: The settings of Qu et al. (section 3 of the paper, and Eq. 1 as written): a ResNet18 trained end
#: to end on 224 px patches, every neighbour's patch through the trunk with gradient, raw ``log1p``
#: targets, Adam (lr 1e-4, StepLR every 50 epochs by 0.9), batch 8, 20 epochs, flips and 90-degree
#: rotations, no validation.
PAPER = _recipe(
    "paper",
    "Qu et al. section 3: ResNet18 end to end at 224 px (full-gradient neighbour branch), raw log1p targets, "
    "Adam lr 1e-4 with StepLR(50, 0.9), batch 8, 20 epochs, flips and 90-degree rotations.",
    model={
        "image_size": 224,
        "trunk": "finetune",
        "pooling": "avg",
        "neighbor_trunk_grad": True,
        "standardize_targets": False,
        "latent_dim": 512,
        "n_neighbors": 8,
        "hyperedge_degree": 4,
        "n_hgnn_layers": 2,
        "temperature": 0.05,
        "lambda_query": 1.0,
        "lambda_neighbor": 0.5,
        "gene_dropout": 0.0,
        "translator_hidden": 256,
        "dropout": 0.0,
        "translator_dropout": 0.0,
    },
    train={
        "max_epochs": 20,
        "batch_size": 8,
        "optimizer": "adam",
        "lr": 1e-4,
        "weight_decay": 0.0,
        "schedule": "step",
        "lr_step_size": 50,
        "lr_gamma": 0.9,
        "augment": "dihedral",
        "validation": None,
        "best_epoch": False,
        "precision": "32-true",
        "batches": "mixed",
        "center_sections": False,
        "tta": False,
    },
)

#: The default, chosen on inner splits of the HER2ST training sections (C2 never loaded; see the user
#: guide and ``benchmarks/README.md``); trains ~900 spots end to end on a laptop CPU in minutes.
DEFAULT = _recipe(
    "default",
    "End to end at 64 px with cached neighbour features; InfoNCE at temperature 0.1 against a gene encoder "
    "whose input genes are dropped out (p 0.5); per-gene standardised targets, standardised within each "
    "section; AdamW one-cycle (lr 1e-3), batch 32, 20 epochs; flips/rotations and H&E stain jitter; "
    "bfloat16 where the hardware has it; test-time augmentation.",
    model={
        "image_size": 64,
        "trunk": "finetune",
        "pooling": "avg",
        "neighbor_trunk_grad": False,
        "standardize_targets": True,
        "latent_dim": 512,
        "n_neighbors": 8,
        "hyperedge_degree": 4,
        "n_hgnn_layers": 2,
        "temperature": 0.1,
        "lambda_query": 1.0,
        "lambda_neighbor": 0.5,
        "gene_dropout": 0.5,
        "translator_hidden": 256,
        "dropout": 0.0,
        "translator_dropout": 0.2,
    },
    train={
        "max_epochs": 20,
        "batch_size": 32,
        "optimizer": "adamw",
        "lr": 1e-3,
        "weight_decay": 1e-4,
        "schedule": "onecycle",
        "warmup": 0.1,
        "augment": "dihedral+stain",
        "validation": None,
        "best_epoch": False,
        "precision": "auto",
        "batches": "mixed",
        "center_sections": True,
        "tta": True,
    },
)

#: The named recipes, ``"default"`` and ``"paper"``, by name.
RECIPES: dict[str, Recipe] = {r.name: r for r in (DEFAULT, PAPER)}


def get_recipe(name: str | Recipe) -> Recipe:
    """The recipe called ``name`` (``"default"`` or ``"paper"``), or ``name`` itself if it is a
    :class:`Recipe`."""
    if isinstance(name, Recipe):
        return name
    if name not in RECIPES:
        raise ValueError(f"recipe must be one of {sorted(RECIPES)} (or a Recipe), got {name!r}.")
    return RECIPES[name]
