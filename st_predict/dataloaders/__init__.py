"""What training and prediction read: spots' patches (the patch reader, the on-disk patch store), the encoder
feature cache, NH2ST's batches (collate, samplers, datamodule) and the validation split."""

from ._datamodule import NH2STCollate, NH2STDataModule, SectionBatchSampler, even_batches
from ._feature_cache import FeatureCache, image_digest, maps_key, patches_key, state_digest
from ._patch_reader import PatchReader, boxes_outside, crop_boxes
from ._patch_store import PatchStore, patch_store
from ._split import split_validation

__all__ = [
    "FeatureCache",
    "NH2STCollate",
    "NH2STDataModule",
    "PatchReader",
    "PatchStore",
    "SectionBatchSampler",
    "boxes_outside",
    "crop_boxes",
    "even_batches",
    "image_digest",
    "maps_key",
    "patch_store",
    "patches_key",
    "split_validation",
    "state_digest",
]
