"""Tests for :class:`st_predict.nn.CrossAttentionBlock`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from st_predict.nn import CrossAttentionBlock

DIM, HEADS = 32, 4


def _block(seed: int = 0, residual: bool = True) -> CrossAttentionBlock:
    torch.manual_seed(seed)
    block = CrossAttentionBlock(DIM, n_heads=HEADS, residual=residual).eval()
    with torch.no_grad():  # non-trivial LayerNorm affine parameters and attention biases
        for norm in (block.norm_q, block.norm_kv, block.norm_ff):
            norm.weight.normal_(1.0, 0.2)
            norm.bias.normal_(0.0, 0.2)
        for lin in (block.q_proj, block.k_proj, block.v_proj, block.out_proj):
            lin.bias.normal_(0.0, 0.2)
    return block


def _torch_mha(block: CrossAttentionBlock) -> torch.nn.MultiheadAttention:
    """torch's own MultiheadAttention carrying the block's projection weights."""
    mha = torch.nn.MultiheadAttention(DIM, HEADS, batch_first=True).eval()
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([block.q_proj.weight, block.k_proj.weight, block.v_proj.weight]))
        mha.in_proj_bias.copy_(torch.cat([block.q_proj.bias, block.k_proj.bias, block.v_proj.bias]))
        mha.out_proj.weight.copy_(block.out_proj.weight)
        mha.out_proj.bias.copy_(block.out_proj.bias)
    return mha


@pytest.mark.parametrize(("lq", "lk"), [(1, 1), (1, 5), (3, 5), (4, 1)])
def test_attention_matches_torch_multihead_attention(lq, lk):
    block = _block(5)
    mha = _torch_mha(block)
    q, c = torch.randn(3, lq, DIM), torch.randn(3, lk, DIM)
    qn, kv = block.norm_q(q), block.norm_kv(c)
    ref, ref_w = mha(qn, kv, kv, need_weights=True)  # weights averaged over heads
    out, _ = block.attend(qn, kv)
    torch.testing.assert_close(out, ref)
    out_w, w = block.attend(qn, kv, return_weights=True)
    torch.testing.assert_close(out_w, ref)
    torch.testing.assert_close(w, ref_w)
    x = q + ref
    torch.testing.assert_close(block(q, c), x + block.ff(block.norm_ff(x)))
    # Eq. 1 as written (the default): no residual from the query
    plain = _block(5, residual=False)
    torch.testing.assert_close(plain(q, c), ref + plain.ff(plain.norm_ff(ref)))


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
    value = F.linear(block.norm_kv(c), block.v_proj.weight, block.v_proj.bias)
    attended = F.linear(value, block.out_proj.weight, block.out_proj.bias)  # (3, 1, D), broadcast
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
    return _torch_mha(block)(block.norm_q(q), kv, kv, need_weights=False)[0]


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


def test_single_context_token_leaves_query_and_key_projections_without_gradient():
    block = _block(6).train()
    block(torch.randn(4, 1, DIM), torch.randn(4, 1, DIM)).pow(2).sum().backward()
    assert block.q_proj.weight.grad is None and block.k_proj.weight.grad is None
    assert block.v_proj.weight.grad.abs().sum() > 0 and block.out_proj.weight.grad.abs().sum() > 0


def test_attention_dropout_is_active_in_training_only():
    torch.manual_seed(0)
    block = CrossAttentionBlock(DIM, n_heads=HEADS, dropout=0.5)
    q, c = torch.randn(2, 3, DIM), torch.randn(2, 1, DIM)
    block.train()
    assert not torch.allclose(block(q, c), block(q, c))  # dropped weights differ between calls
    block.eval()
    torch.testing.assert_close(block(q, c), block(q, c))


def test_heads_must_divide_dim():
    with pytest.raises(ValueError, match="n_heads"):
        CrossAttentionBlock(30, n_heads=4)


def test_without_residual_a_single_token_output_is_a_function_of_the_context_alone():
    """Eq. 1 with one context token: the query's own features never reach the output, so an InfoNCE
    between phi(h_p, h_g) and phi(h_g, h_p) compares a gene-only and a pathology-only embedding."""
    torch.manual_seed(0)
    for single_key in (False, True):
        block = CrossAttentionBlock(DIM, n_heads=HEADS, residual=False, single_key=single_key).eval()
        c = torch.randn(3, 1, DIM)
        out1, out2 = block(torch.randn(3, 1, DIM), c), block(torch.randn(3, 1, DIM), c)
        torch.testing.assert_close(out1, out2)
        residual = CrossAttentionBlock(DIM, n_heads=HEADS, residual=True, single_key=single_key).eval()
        assert not torch.allclose(residual(torch.randn(3, 1, DIM), c), residual(torch.randn(3, 1, DIM), c))


def test_single_key_block_has_no_query_key_parameters_and_matches_the_full_block():
    torch.manual_seed(1)
    full = CrossAttentionBlock(DIM, n_heads=HEADS).eval()
    lean = CrossAttentionBlock(DIM, n_heads=HEADS, single_key=True).eval()
    assert lean.q_proj is None and lean.k_proj is None and lean.norm_q is None
    missing, unexpected = lean.load_state_dict(full.state_dict(), strict=False)
    assert not missing and all(k.split(".")[0] in ("q_proj", "k_proj", "norm_q") for k in unexpected)
    q, c = torch.randn(4, 2, DIM), torch.randn(4, 1, DIM)
    torch.testing.assert_close(lean(q, c), full(q, c))
    with pytest.raises(ValueError, match="one context token"):
        lean(q, torch.randn(4, 3, DIM))
