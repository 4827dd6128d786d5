"""Issue 15: training and prediction change process-wide settings only while they run. Thread limits,
logger levels and filters are what they were afterwards; DataLoader workers draw their own
augmentations."""

import logging

import lightning.pytorch as pl
import pytest
import torch
from helpers import SMALL, setup, slide_tissue, write_slide

from st_predict import NH2ST
from st_predict._utils import _threads

pytestmark = pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode.*:UserWarning")

_LOGGERS = ("scvi", "lightning", "lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "lightning.fabric",
            "pytorch_lightning", "st_predict", "spatialdata._logging", "squidpy")


def _logger_state():
    out = {}
    for name in _LOGGERS:
        log = logging.getLogger(name)
        out[name] = (log.level, log.disabled, log.propagate, tuple(log.filters), tuple(log.handlers))
    return out


class _ThreadsInside(pl.Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(torch.get_num_threads())


def test_train_predict_and_predict_slide_leave_threads_and_loggers_as_they_were(tissue, tmp_path, monkeypatch):
    adata = tissue.copy()
    for entry in adata.uns["spatial"].values():
        entry["metadata"] = {"pixel_size_um": 0.5}
    setup(adata)  # the registry reads the pixel size now
    model = NH2ST(adata, **SMALL)
    before_threads = torch.get_num_threads()
    monkeypatch.setattr(_threads, "available_cores", lambda: 1)  # a limit that applies inside
    try:
        torch.set_num_threads(2)
        loggers = _logger_state()
        inside = _ThreadsInside()
        model.train(max_epochs=1, progress=False, callbacks=[inside])
        assert inside.seen and set(inside.seen) == {1}  # limited while training...
        assert torch.get_num_threads() == 2  # ...and as before afterwards
        assert _logger_state() == loggers
        model.predict(adata)
        assert torch.get_num_threads() == 2 and _logger_state() == loggers
        model.save(tmp_path / "m")
        NH2ST.load(tmp_path / "m")
        assert torch.get_num_threads() == 2 and _logger_state() == loggers
        pytest.importorskip("lazyslide")
        slide = write_slide(tmp_path / "s.tiff", slide_tissue(1024), mpp=0.5)
        model.predict_slide(slide, progress=False)
        assert torch.get_num_threads() == 2 and _logger_state() == loggers
    finally:
        torch.set_num_threads(before_threads)


class _SameSpots(torch.utils.data.Sampler):
    """Every batch holds the same spots, so workers augment identical inputs."""

    def __iter__(self):
        return iter([list(range(8))] * 4)

    def __len__(self):
        return 4


def _augmented_batches(seed: int, workers: int):
    from st_predict.train import NH2STCollate

    patches = torch.arange(8 * 3 * 8 * 8, dtype=torch.int64).remainder(251).to(torch.uint8).reshape(8, 3, 8, 8)
    collate = NH2STCollate(torch.zeros(8, 2), patches=patches, augment="dihedral+stain", seed=seed)
    torch.manual_seed(123)  # the seed torch gives each worker of this loader comes from it
    loader = torch.utils.data.DataLoader(list(range(8)), batch_sampler=_SameSpots(), collate_fn=collate,
                                         num_workers=workers, worker_init_fn=_threads.single_thread_worker)
    return [b["patches"] for b in loader]


@pytest.mark.slow
def test_two_dataloader_workers_draw_different_augmentations_reproducibly():
    first = _augmented_batches(seed=0, workers=2)  # batches 0, 2 from worker 0; 1, 3 from worker 1
    assert not torch.equal(first[0], first[1])  # the same spots, augmented differently by the two workers
    again = _augmented_batches(seed=0, workers=2)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))  # the same seed: the same draws
    other = _augmented_batches(seed=1, workers=2)
    assert not torch.equal(first[0], other[0])
    # in one process, successive batches differ too (one generator, drawn on)
    single = _augmented_batches(seed=0, workers=0)
    assert not torch.equal(single[0], single[1])
