"""The learning-rate schedule."""

import pytest
import torch

from st_predict.train._trainingplan import onecycle_warmup


def test_onecycle_with_a_one_step_warmup_runs():
    # a 0.1 warm-up of 10 steps: torch's OneCycleLR divides by zero on its first step unless nudged
    # (found training a 72-spot model for 5 epochs of 2 batches)
    assert onecycle_warmup(0.1, 100) == 0.1
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=10, pct_start=onecycle_warmup(0.1, 10))
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(9):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(1.0 / 25) and 0.9 < lrs[1] <= 1.0  # warmed up after one step
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:], strict=False))  # then annealed down
