"""scvi-tools models, and the named recipes they train with (pure Python: the command line reads them without
importing scvi-tools or torch)."""

from st_predict._utils import lazy_exports

from ._recipes import DEFAULT, PAPER, Recipe, get_recipe
from ._recipes import RECIPES as _RECIPES

#: The named recipes (:class:`Recipe`) by name: ``"default"`` and ``"paper"``.
RECIPES = _RECIPES

__getattr__, __dir__ = lazy_exports(__name__, {
    "NH2ST": "._nh2st", "Pretrained": "._pretrained", "SAVE_FORMAT": "._save_load", "PatchField": "._fields",
    "thin_counts": "._depth", "measured_moments": "._depth", "measurement_bounds": "._reliability", "expected_bounds": "._reliability",
    "default_num_workers": "st_predict.tl",  # where it was before st_predict.tl
}, eager=globals())

__all__ = ["DEFAULT", "NH2ST", "PAPER", "Pretrained", "RECIPES", "SAVE_FORMAT", "PatchField", "Recipe", "expected_bounds", "get_recipe",
           "measured_moments", "measurement_bounds", "thin_counts"]
