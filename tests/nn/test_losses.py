"""Tests for :func:`st_predict.nn.info_nce` against an explicit, loop-based computation."""

from __future__ import annotations

import math

import pytest
import torch

from st_predict.nn import info_nce


def _cos(u: list[float], v: list[float]) -> float:
    dot = sum(a * b for a, b in zip(u, v, strict=True))
    nu = math.sqrt(sum(a * a for a in u))
    nv = math.sqrt(sum(b * b for b in v))
    return dot / (nu * nv)


def _hand_info_nce(anchor: torch.Tensor, positive: torch.Tensor, tau: float, symmetric: bool) -> float:
    a, p = anchor.tolist(), positive.tolist()
    n = len(a)
    s = [[_cos(a[i], p[j]) / tau for j in range(n)] for i in range(n)]
    # pathology (row) anchors: softmax over the positives j for each anchor i
    rows = 0.0
    for i in range(n):
        denom = sum(math.exp(s[i][j]) for j in range(n))
        rows += -math.log(math.exp(s[i][i]) / denom)
    rows /= n
    if not symmetric:
        return rows
    # gene (column) anchors: softmax over the anchors i for each positive j
    cols = 0.0
    for j in range(n):
        denom = sum(math.exp(s[i][j]) for i in range(n))
        cols += -math.log(math.exp(s[j][j]) / denom)
    cols /= n
    return 0.5 * (rows + cols)


@pytest.mark.parametrize("tau", [0.5, 0.2])
@pytest.mark.parametrize("symmetric", [False, True])
def test_info_nce_matches_hand_computation(tau, symmetric):
    torch.manual_seed(0)
    anchor = torch.randn(4, 3, dtype=torch.float64)
    positive = torch.randn(4, 3, dtype=torch.float64)
    got = info_nce(anchor, positive, temperature=tau, symmetric=symmetric)
    assert got.ndim == 0
    assert got.item() == pytest.approx(_hand_info_nce(anchor, positive, tau, symmetric), rel=1e-10, abs=1e-12)


def test_info_nce_one_directional_and_symmetric_differ():
    # guards against `symmetric` being ignored (or always on): the two directions differ here
    torch.manual_seed(1)
    anchor = torch.randn(4, 3, dtype=torch.float64)
    positive = torch.randn(4, 3, dtype=torch.float64)
    one = _hand_info_nce(anchor, positive, 0.3, symmetric=False)
    both = _hand_info_nce(anchor, positive, 0.3, symmetric=True)
    assert abs(one - both) > 1e-3
    assert info_nce(anchor, positive, 0.3).item() == pytest.approx(one, rel=1e-10)
    assert info_nce(anchor, positive, 0.3, symmetric=True).item() == pytest.approx(both, rel=1e-10)


def test_info_nce_uses_cosine_similarity():
    # rescaling rows by positive factors must not change a cosine-similarity loss
    torch.manual_seed(2)
    anchor = torch.randn(4, 5, dtype=torch.float64)
    positive = torch.randn(4, 5, dtype=torch.float64)
    scale = torch.tensor([[0.1], [3.0], [7.0], [0.5]], dtype=torch.float64)
    ref = info_nce(anchor, positive, 0.1)
    torch.testing.assert_close(info_nce(anchor * scale, positive / scale, 0.1), ref)


@pytest.mark.parametrize("symmetric", [False, True])
def test_info_nce_near_zero_for_aligned_separated_pairs(symmetric):
    emb = 3.0 * torch.eye(4)  # orthogonal rows: positives have cos 1, negatives cos 0
    loss = info_nce(emb, emb.clone(), temperature=0.01, symmetric=symmetric)
    assert 0.0 <= loss.item() < 1e-6


@pytest.mark.parametrize("batch", [2, 4, 7])
def test_info_nce_is_log_b_for_identical_embeddings(batch):
    torch.manual_seed(3)
    row = torch.randn(1, 6)
    emb = row.expand(batch, 6).clone()
    loss = info_nce(emb, emb.clone(), temperature=0.05)
    assert loss.item() == pytest.approx(math.log(batch), rel=1e-5)


def test_info_nce_gradient_flows_to_both_inputs():
    torch.manual_seed(4)
    anchor = torch.randn(4, 3, requires_grad=True)
    positive = torch.randn(4, 3, requires_grad=True)
    info_nce(anchor, positive, 0.1).backward()
    assert anchor.grad is not None and anchor.grad.abs().sum() > 0
    assert positive.grad is not None and positive.grad.abs().sum() > 0


def test_info_nce_rejects_single_item_batch():
    with pytest.raises(ValueError, match="batch"):
        info_nce(torch.randn(1, 3), torch.randn(1, 3))


@pytest.mark.parametrize(
    ("a_shape", "p_shape"),
    [((4, 3), (4, 5)), ((4, 3), (5, 3)), ((4,), (4,)), ((2, 4, 3), (2, 4, 3))],
)
def test_info_nce_rejects_bad_shapes(a_shape, p_shape):
    with pytest.raises(ValueError, match="shape"):
        info_nce(torch.randn(*a_shape), torch.randn(*p_shape))


@pytest.mark.parametrize("tau", [0.0, -0.1])
def test_info_nce_rejects_non_positive_temperature(tau):
    with pytest.raises(ValueError, match="temperature"):
        info_nce(torch.randn(4, 3), torch.randn(4, 3), temperature=tau)
