"""Thread defaults: never more compute threads than the cores this process may use.

Torch and the BLAS libraries start as many threads as the machine has cores, and count the host's
cores even inside a container or a CPU affinity mask that allows fewer. With more busy threads than
cores, OpenMP's spinning threads slowed training here by more than 10x (``benchmarks/README.md``).
So st_predict lowers (never raises) torch's and BLAS's thread counts to the usable cores before it
trains or predicts, and DataLoader worker processes run torch with one thread each.
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)


def available_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota if one is set."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(float(quota) / float(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def limit_threads() -> int:
    """Lower torch's intra-op threads and the BLAS/OpenMP pools to :func:`available_cores` if they
    are above it (a lower setting of the user's stays). Returns torch's thread count."""
    cores = available_cores()
    if torch.get_num_threads() > cores:
        logger.info("Using %d torch threads (the cores available to this process), not %d.", cores,
                    torch.get_num_threads())
        torch.set_num_threads(cores)
    try:
        from threadpoolctl import threadpool_info, threadpool_limits

        if any(pool.get("num_threads", 0) > cores for pool in threadpool_info()):
            threadpool_limits(limits=cores)
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        pass
    return torch.get_num_threads()


def single_thread_worker(worker_id: int) -> None:
    """``worker_init_fn`` for DataLoader workers: torch computes with one thread in each worker (as
    torch's own worker set-up also does), so that workers and the main process do not fight over the
    cores.

    Other pools are not touched here: resizing BLAS (threadpoolctl) or OpenCV thread pools in a
    process forked from one whose pools had been busy deadlocked the worker (both seen in the test
    suite), and the workers only crop and decode images.
    """
    torch.set_num_threads(1)


def interactive() -> bool:
    """Whether progress bars have a reader: a terminal, or a Jupyter kernel (not a log file)."""
    import sys

    return sys.stderr.isatty() or "ipykernel" in sys.modules
