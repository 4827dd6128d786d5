"""Thread limits: never more compute threads than the cores this process may use, and only while
st_predict computes.

Torch and the BLAS libraries start as many threads as the machine has cores, and count the host's
cores even inside a container or a CPU affinity mask that allows fewer. With more busy threads than
cores, OpenMP's spinning threads slowed training here by more than 10x (``benchmarks/README.md``).
So while st_predict trains or predicts (:func:`thread_limits`) torch's and BLAS's thread counts are
lowered (never raised) to the usable cores, and put back as they were afterwards; DataLoader worker
processes run torch with one thread each.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

logger = logging.getLogger(__name__)


def available_cores() -> int:
    """Cores this process may run on: joblib's count, which honours the CPU affinity mask and a cgroup CPU
    quota (a container limited to 2 of the host's 64 cores counts 2)."""
    from joblib import cpu_count

    return max(1, int(cpu_count()))


@contextlib.contextmanager
def thread_limits() -> Iterator[int]:
    """Inside the block, torch's intra-op threads and the BLAS/OpenMP pools are at most
    :func:`available_cores` (a lower setting of the user's stays); on exit they are what they were.
    Yields torch's thread count inside."""
    import torch
    from threadpoolctl import threadpool_info, threadpool_limits

    cores = available_cores()
    before = torch.get_num_threads()
    limiter = None
    try:
        if before > cores:
            logger.debug("Using %d torch threads (the cores available to this process), not %d.", cores, before)
            torch.set_num_threads(cores)
        if any(pool.get("num_threads", 0) > cores for pool in threadpool_info()):
            limiter = threadpool_limits(limits=cores)
        yield torch.get_num_threads()
    finally:
        if limiter is not None:
            limiter.restore_original_limits()
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def single_thread_worker(worker_id: int) -> None:
    """``worker_init_fn`` for DataLoader workers: torch computes with one thread in each worker (as
    torch's own worker set-up also does), so that workers and the main process do not fight over the
    cores.

    Other pools are not touched here: resizing BLAS (threadpoolctl) or OpenCV thread pools in a
    process forked from one whose pools had been busy deadlocked the worker (both seen in the test
    suite), and the workers only crop and decode images.
    """
    import torch

    torch.set_num_threads(1)


def interactive() -> bool:
    """Whether progress bars have a reader: a terminal, or a Jupyter kernel (not a log file)."""
    import sys

    if sys.stderr.isatty():
        return True
    # a Jupyter kernel runs this process (ipykernel merely imported, e.g. by a test that ran a notebook, is not one)
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return type(shell).__name__ == "ZMQInteractiveShell"
