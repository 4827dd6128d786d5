"""The named recipes of NH2ST: a recipe is a named pair of settings, the network's
(:class:`~st_predict.module.NetworkSettings`) and its training's (:class:`~st_predict.train.TrainingSettings`).
Pure Python, so the command line reads them without importing torch."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from st_predict._utils import InputError
from st_predict.module import NetworkSettings
from st_predict.train import TrainingSettings


@dataclass(frozen=True)
class Recipe:
    """A named pair of settings: the network's (:class:`~st_predict.module.NetworkSettings`) and its
    training's (:class:`~st_predict.train.TrainingSettings`), plus whether predictions average the 8
    flips/rotations of each patch (``tta``). Arguments given to :class:`~st_predict.NH2ST` and
    :meth:`~st_predict.NH2ST.train` override it (:meth:`dataclasses.replace`). Immutable."""

    name: str
    description: str
    network: NetworkSettings = field(default_factory=NetworkSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    tta: bool = True

    def replace(self, **changes) -> Recipe:
        """A copy with ``changes`` (e.g. ``name=``, ``training=``)."""
        return dataclasses.replace(self, **changes)

    def __setstate__(self, state: dict) -> None:
        # models saved in format 1 pickled recipes as sorted (name, value) items of two dicts
        if "model_items" in state:
            model, train = dict(state["model_items"]), dict(state["train_items"])
            tta = bool(train.pop("tta", False))
            state = {
                "name": state["name"], "description": state["description"],
                "network": NetworkSettings.from_dict({"context": "patch", **model}), "training": TrainingSettings.from_dict(train), "tta": tta,
            }
        for key, value in state.items():
            object.__setattr__(self, key, value)


#: The default, chosen on inner splits of the HER2ST training sections (C2 never loaded; see the user
#: guide and ``benchmarks/README.md``); trains ~900 spots end to end on a laptop CPU in minutes. Its
#: settings are the defaults of :class:`~st_predict.module.NetworkSettings` and
#: :class:`~st_predict.train.TrainingSettings`.
DEFAULT = Recipe(
    "default",
    "End to end at 64 px with cached neighbour features; the translator reads each spot's patch and the "
    "pathology hypergraph of its 8 nearest spots (context 'neighbors'); InfoNCE at temperature 0.1 against a gene encoder "
    "whose input genes are dropped out (p 0.5); per-gene standardised targets, standardised within each "
    "section; AdamW one-cycle (lr 1e-3), batch 32, 20 epochs; flips/rotations and H&E stain jitter; "
    "bfloat16 where the hardware has it; test-time augmentation.",
)

#: The settings of Qu et al. (section 3 of the paper, and Eq. 1 as written), each given here so that
#: the recipe does not follow a change of the defaults: a ResNet18 trained end to end on 224 px
#: patches, every neighbour's patch through the trunk with gradient, raw ``log1p`` targets, Adam (lr
#: 1e-4, StepLR every 50 epochs by 0.9), batch 8, 20 epochs, flips and 90-degree rotations, no
#: validation.
PAPER = Recipe(
    "paper",
    "Qu et al. section 3: ResNet18 end to end at 224 px (full-gradient neighbour branch), raw log1p targets, "
    "Adam lr 1e-4 with StepLR(50, 0.9), batch 8, 20 epochs, flips and 90-degree rotations.",
    network=NetworkSettings(
        image_size=224, trunk="finetune", pooling="avg", neighbor_trunk_grad=True, standardize_targets=False,
        context="patch",
        latent_dim=512, n_neighbors=8, hyperedge_degree=4, n_hgnn_layers=2, temperature=0.05, lambda_query=1.0,
        lambda_neighbor=0.5, gene_dropout=0.0, translator_hidden=256, dropout=0.0, translator_dropout=0.0,
    ),
    training=TrainingSettings(
        max_epochs=20, batch_size=8, optimizer="adam", lr=1e-4, weight_decay=0.0, schedule="step", lr_step_size=50,
        lr_gamma=0.9, augment="dihedral", validation=None, best_epoch=False, precision="32-true", batches="mixed",
        center_sections=False,
    ),
    tta=False,
)

#: The named recipes, ``"default"`` and ``"paper"``, by name.
RECIPES: dict[str, Recipe] = {r.name: r for r in (DEFAULT, PAPER)}


def get_recipe(name: str | Recipe) -> Recipe:
    """The recipe called ``name`` (``"default"`` or ``"paper"``), or ``name`` itself if it is a
    :class:`Recipe`."""
    if isinstance(name, Recipe):
        return name
    if name not in RECIPES:
        raise InputError(f"recipe must be one of {sorted(RECIPES)} (or a Recipe), got {name!r}.")
    return RECIPES[name]
