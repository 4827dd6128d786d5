"""Thread defaults: no more compute threads than usable cores; one per DataLoader worker."""

import numpy as np
import torch
from torch.utils.data import DataLoader

from st_predict._utils import _threads


class _ThreadReport(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        return torch.tensor([torch.get_num_threads()])


def test_usable_cores_follow_the_affinity_mask():
    import os

    assert 1 <= _threads.available_cores() <= len(os.sched_getaffinity(0))


def test_thread_limits_apply_inside_and_are_restored(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(_threads, "available_cores", lambda: 1)
        torch.set_num_threads(2)
        with _threads.thread_limits() as inside:
            assert inside == 1 and torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        monkeypatch.setattr(_threads, "available_cores", lambda: 64)
        torch.set_num_threads(1)
        with _threads.thread_limits() as inside:
            assert inside == 1  # a lower setting stays: never raised
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_dataloader_workers_compute_with_one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(max(2, before))  # the parent has more
    try:
        loader = DataLoader(_ThreadReport(), batch_size=1, num_workers=1, worker_init_fn=_threads.single_thread_worker)
        assert [b[0].tolist() for b in loader] == [[1], [1]]
    finally:
        torch.set_num_threads(before)


def test_the_training_loaders_use_the_single_thread_worker_init(tissue):
    from st_predict.train import NH2STDataModule

    dm = NH2STDataModule(np.arange(20), np.arange(20, 30), collate=list, val_collate=list, batch_size=4,
                         num_workers=1)
    assert dm.train_dataloader().worker_init_fn is _threads.single_thread_worker
    assert dm.val_dataloader().worker_init_fn is _threads.single_thread_worker


def test_progress_bars_only_where_someone_reads_them(monkeypatch):
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    assert not _threads.interactive()  # a log file
    # ipykernel imported (a test ran a notebook) is not a kernel running this process; a kernel's shell is
    import types

    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    fake = types.ModuleType("IPython")
    fake.get_ipython = lambda: None
    monkeypatch.setitem(sys.modules, "IPython", fake)
    assert not _threads.interactive()
    fake.get_ipython = lambda: type("ZMQInteractiveShell", (), {})()
    assert _threads.interactive()  # a notebook
    fake.get_ipython = lambda: None
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert _threads.interactive()  # a terminal
