"""Tests for :class:`st_predict.nn.CrossAttentionBlock`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from st_predict.nn import CrossAttentionBlock

DIM, HEADS = 32, 4


def _block(seed: int = 0) -> CrossAttentionBlock:
    torch.manual_seed(seed)
    block = CrossAttentionBlock(DIM, n_heads=HEADS).eval()
    with torch.no_grad():  # non-trivial LayerNorm affine parameters and attention biases
        for norm in (block.norm_q, block.norm_kv, block.norm_ff):
            norm.weight.normal_(1.0, 0.2)
            norm.bias.normal_(0.0, 0.2)
        block.attn.in_proj_bias.normal_(0.0, 0.2)
        block.attn.out_proj.bias.normal_(0.0, 0.2)
    return block


@pytest.mark.parametrize(("lq", "lk"), [(1, 1), (1, 5), (3, 5), (4, 1)])
def test_output_shape_equals_query_shape(lq, lk):
    block = _block()
    q, c = torch.randn(2, lq, DIM), torch.randn(2, lk, DIM)
    out = block(q, c)
    assert out.shape == q.shape
    out, w = block(q, c, return_weights=True)
    assert out.shape == q.shape
    assert w.shape == (2, lq, lk)


def test_single_context_token_has_unit_weights_and_ignores_query_key_interaction():
    block = _block(1)
    q, c = torch.randn(3, 2, DIM), torch.randn(3, 1, DIM)
    out, w = block(q, c, return_weights=True)
    torch.testing.assert_close(w, torch.ones(3, 2, 1))
    # with one key the attention output is the projected value of the context alone:
    # x = q + W_o (W_v LN_kv(c) + b_v) + b_o, then x + FF(LN_ff(x))
    _, _, w_v = block.attn.in_proj_weight.chunk(3)
    _, _, b_v = block.attn.in_proj_bias.chunk(3)
    value = F.linear(block.norm_kv(c), w_v, b_v)
    attended = block.attn.out_proj(value)  # (3, 1, D), broadcast over the queries
    x = q + attended
    expected = x + block.ff(block.norm_ff(x))
    torch.testing.assert_close(out, expected)
    # hence the attended part is the same for any query
    q2 = torch.randn(3, 2, DIM)
    delta1 = _attended_part(block, q, c)
    delta2 = _attended_part(block, q2, c)
    torch.testing.assert_close(delta1, delta2)
    torch.testing.assert_close(delta1, attended.expand(3, 2, DIM))


def _attended_part(block: CrossAttentionBlock, q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    kv = block.norm_kv(c)
    return block.attn(block.norm_q(q), kv, kv, need_weights=False)[0]


def test_several_context_tokens_weights_are_a_distribution():
    block = _block(2)
    q, c = torch.randn(2, 3, DIM), torch.randn(2, 6, DIM)
    _, w = block(q, c, return_weights=True)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3))
    assert torch.all(w >= 0)
    assert (w.amax(-1) - w.amin(-1)).min() > 1e-4  # not uniform over the keys
    # and the weights depend on the query
    _, w2 = block(torch.randn(2, 3, DIM), c, return_weights=True)
    assert not torch.allclose(w, w2)


def test_residual_prenorm_structure_with_several_tokens():
    block = _block(3)
    q, c = torch.randn(2, 3, DIM), torch.randn(2, 4, DIM)
    x = q + _attended_part(block, q, c)
    torch.testing.assert_close(block(q, c), x + block.ff(block.norm_ff(x)))


def test_gradients_reach_query_and_context():
    block = _block(4).train()
    q = torch.randn(2, 1, DIM, requires_grad=True)
    c = torch.randn(2, 4, DIM, requires_grad=True)
    block(q, c).pow(2).sum().backward()
    assert q.grad.abs().sum() > 0 and c.grad.abs().sum() > 0
    for name, p in block.named_parameters():
        assert p.grad is not None, name


def test_heads_must_divide_dim():
    with pytest.raises(ValueError, match="n_heads"):
        CrossAttentionBlock(30, n_heads=4)
