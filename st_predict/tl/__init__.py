"""Tools on trained models: whole slides (:func:`predict_slide`), many slides on dask (:func:`predict_slides`), a
model as a LazySlide tile-prediction model (:func:`as_tile_model`). ``model.predict_slide(...)`` and
``model.predict_slides(...)`` call these."""

from ._bins import aggregate_bins
from ._cohort import DONE, predict_slides, read_manifest, write_prediction
from ._cohort import run as run_cohort
from ._slide import as_tile_model, predict_slide
from ._slide_open import default_num_workers, open_slide

__all__ = ["DONE", "aggregate_bins", "as_tile_model", "default_num_workers", "open_slide", "predict_slide", "predict_slides",
           "read_manifest", "run_cohort", "write_prediction"]
