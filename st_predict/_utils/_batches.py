"""The one batch loop of prediction and embedding: a function over batches of rows, the results in one float32
CPU tensor, a module in eval mode meanwhile, no autograd."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import numpy as np


def index_batches(rows, batch_size: int) -> list[np.ndarray]:
    """``rows`` (a count or an array of row indices) cut into consecutive batches of ``batch_size``."""
    rows = np.arange(rows) if np.isscalar(rows) else np.asarray(rows, dtype=np.int64)
    return [rows[s : s + batch_size] for s in range(0, len(rows), batch_size)]


@contextlib.contextmanager
def eval_mode(module) -> Iterator[None]:
    """``module`` in eval mode inside the block, in the mode it was in afterwards."""
    was = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was)


def run_batches(
    fn: Callable,
    batches: Iterable,
    n_rows: int | None = None,
    module=None,
    progress: bool = False,
    desc: str = "Predicting",
    inference: bool = True,
):
    """``fn(batch)`` for every batch (index arrays, or a DataLoader's batches), concatenated along the first
    axis into one float32 CPU tensor (of ``n_rows`` rows, allocated at the first result, when known). Under
    :func:`torch.inference_mode` (``inference=False``: :func:`torch.no_grad`, for a result updated in place
    later), with ``module`` in eval mode meanwhile; ``progress`` shows a bar."""
    import torch

    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=desc, unit="batch")
    parts, out, start = [], None, 0
    grad = torch.inference_mode() if inference else torch.no_grad()
    with grad, eval_mode(module) if module is not None else contextlib.nullcontext():
        for batch in batches:
            res = fn(batch).float().cpu()
            if n_rows is None:
                parts.append(res)
                continue
            if out is None:
                out = torch.empty((n_rows, *res.shape[1:]), dtype=torch.float32)
            out[start : start + len(res)] = res
            start += len(res)
    if n_rows is None:
        return torch.cat(parts) if parts else None
    if out is not None and start != n_rows:
        raise RuntimeError(f"{start} rows for {n_rows}.")
    return out
