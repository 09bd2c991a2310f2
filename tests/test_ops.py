"""The three forms of causal linear attention agree, keep an fp32 state and honour zeroed (padded) keys."""

from __future__ import annotations

import pytest
import torch

from t2r_hf.ops import linear_attention_chunked, linear_attention_naive, linear_attention_recurrent

CASES = [
    pytest.param(2, 4, 4, 37, 8, 16, 5, id="B2-Hq4-Hkv4-T37-F8-D16-C5"),
    pytest.param(1, 6, 2, 64, 12, 8, 16, id="B1-Hq6-Hkv2-T64-F12-D8-C16"),
    pytest.param(3, 2, 1, 9, 4, 4, 64, id="B3-Hq2-Hkv1-T9-F4-D4-C64"),
    pytest.param(1, 1, 1, 1, 3, 5, 4, id="B1-T1"),
]


def _inputs(batch, hq, hkv, length, feat, dim, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(batch, hq, length, feat, generator=g).to(dtype)
    k = torch.rand(batch, hkv, length, feat, generator=g).to(dtype)
    v = torch.randn(batch, hkv, length, dim, generator=g).to(dtype)
    return q, k, v


@pytest.mark.parametrize("batch,hq,hkv,length,feat,dim,chunk", CASES)
def test_naive_chunked_recurrent_agree(batch, hq, hkv, length, feat, dim, chunk):
    q, k, v = _inputs(batch, hq, hkv, length, feat, dim)
    y_naive, (s_n, z_n) = linear_attention_naive(q, k, v, eps=1e-2)
    y_chunk, (s_c, z_c) = linear_attention_chunked(q, k, v, eps=1e-2, chunk_size=chunk)
    y_rec, (s_r, z_r) = linear_attention_recurrent(q, k, v, eps=1e-2)
    assert y_naive.shape == (batch, hq, length, dim)
    torch.testing.assert_close(y_chunk, y_naive, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y_rec, y_naive, atol=1e-5, rtol=1e-5)
    for s, z in ((s_c, z_c), (s_r, z_r)):
        torch.testing.assert_close(s, s_n, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(z, z_n, atol=1e-4, rtol=1e-5)


def test_matches_explicit_formula():
    """y_i = sum_{j<=i} (q_i.k_j) v_j / max(sum_{j<=i} q_i.k_j, eps), written as plain loops."""
    q, k, v = _inputs(1, 1, 1, 6, 3, 2, seed=3)
    y, _ = linear_attention_chunked(q, k, v, eps=1e-2, chunk_size=4)
    for i in range(6):
        w = torch.stack([q[0, 0, i] @ k[0, 0, j] for j in range(i + 1)])
        expected = (w[:, None] * v[0, 0, : i + 1]).sum(0) / max(w.sum().item(), 1e-2)
        torch.testing.assert_close(y[0, 0, i], expected, atol=1e-6, rtol=1e-5)


def test_eps_clamps_small_denominators():
    q, k, v = _inputs(1, 1, 1, 4, 2, 3)
    q = q * 1e-4  # q.k << eps: output = numerator / eps
    y, _ = linear_attention_naive(q, k, v, eps=1e-2)
    scores = (q[0, 0] @ k[0, 0].T).tril()
    torch.testing.assert_close(y[0, 0], scores @ v[0, 0] / 1e-2, atol=1e-7, rtol=1e-4)


def test_state_continuation_equals_one_pass():
    q, k, v = _inputs(2, 4, 2, 30, 6, 8, seed=1)
    y_full, state_full = linear_attention_chunked(q, k, v, eps=1e-2, chunk_size=7)
    y_a, state_a = linear_attention_chunked(q[:, :, :13], k[:, :, :13], v[:, :, :13], eps=1e-2, chunk_size=7)
    y_b, state_b = linear_attention_chunked(
        q[:, :, 13:], k[:, :, 13:], v[:, :, 13:], eps=1e-2, chunk_size=7, state=state_a
    )
    torch.testing.assert_close(torch.cat([y_a, y_b], dim=2), y_full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state_b[0], state_full[0], atol=1e-4, rtol=1e-5)


def test_zeroed_keys_contribute_nothing():
    q, k, v = _inputs(1, 2, 2, 10, 4, 4, seed=2)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, :3], v2[:, :, :3] = 0, 0  # three "padding" positions in front
    y_pad, (s_pad, _) = linear_attention_chunked(q, k2, v2, eps=1e-2, chunk_size=4)
    y_ref, (s_ref, _) = linear_attention_chunked(q[:, :, 3:], k[:, :, 3:], v[:, :, 3:], eps=1e-2, chunk_size=4)
    torch.testing.assert_close(y_pad[:, :, 3:], y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s_pad, s_ref)
    assert torch.count_nonzero(y_pad[:, :, :3]) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_state_is_fp32_and_output_keeps_dtype(dtype):
    q, k, v = _inputs(1, 2, 2, 20, 4, 4, dtype=dtype)
    for fn in (linear_attention_chunked, linear_attention_recurrent, linear_attention_naive):
        y, (s, z) = fn(q, k, v, eps=1e-2)
        assert y.dtype == dtype and s.dtype == torch.float32 and z.dtype == torch.float32
    y32, _ = linear_attention_chunked(q.float(), k.float(), v.float(), eps=1e-2)
    torch.testing.assert_close(y.float(), y32, atol=2e-2, rtol=2e-2)


def test_chunked_memory_is_linear_in_length():
    """The chunked form never materialises T x T: its largest intermediate grows linearly with T."""
    q, k, v = _inputs(1, 1, 1, 4096, 4, 4)
    sizes = []

    def hook(*args, **kwargs):
        out = orig(*args, **kwargs)
        sizes.append(out.numel())
        return out

    orig = torch.einsum
    torch.einsum = hook
    try:
        linear_attention_chunked(q, k, v, eps=1e-2, chunk_size=64)
    finally:
        torch.einsum = orig
    assert max(sizes) <= 4096 * 64  # T * C, far below T * T = 16.7M


def test_bad_grouping_raises():
    q, k, v = _inputs(1, 3, 2, 4, 2, 2)
    with pytest.raises(ValueError, match="query heads"):
        linear_attention_chunked(q, k, v, eps=1e-2)


def test_kernel_option_on_cpu():
    """`kernel` is validated; 'auto' runs the PyTorch path on CPU; 'fla' refuses clearly where it cannot run."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from t2r_hf import T2RConfig, T2RForCausalLM

    with pytest.raises(ValueError, match="kernel"):
        T2RConfig(source_config=LlamaConfig(num_hidden_layers=1).to_dict(), kernel="cuda")
    torch.manual_seed(0)
    src = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1))
    model = T2RForCausalLM.from_softmax_pretrained(src, feature_dim=8).eval()
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        auto = model(ids).logits
        model.set_kernel("torch")
        assert torch.equal(model(ids).logits, auto)
        model.set_kernel("fla")
        assert model.config.kernel == "fla"
        with pytest.raises(RuntimeError, match="kernel='fla'.*CUDA"):
            model(ids)
    with pytest.raises(ValueError, match="kernel"):
        model.set_kernel("triton")
