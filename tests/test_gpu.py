"""GPU checks: flash-linear-attention's kernels against the pure-PyTorch path, on a CUDA device.

Run with `pytest -m gpu` on a machine with CUDA and the `gpu` extra (`fla-core`). Skipped where either is missing
(CI is CPU-only); the CPU-side behaviour of the kernel option is tested in test_ops.py.
"""

import pytest
import torch

from t2r_hf import T2RForCausalLM
from t2r_hf.kernels import fla_available, fla_numerator_denominator
from t2r_hf.ops import chunked_numerator_denominator, normalise, recurrent_numerator_denominator

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not fla_available(), reason="needs flash-linear-attention (pip install 't2r-hf[gpu]')"),
]

CUDA = "cuda"


@pytest.fixture(autouse=True)
def _exact_reference():
    """The PyTorch reference in true fp32 (no TF32), so differences are the kernel's own."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b|."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12)).item()


def _inputs(dtype, batch=2, q_heads=6, kv_heads=2, length=300, feat=32, dim=64, seed=0):
    g = torch.Generator(device=CUDA).manual_seed(seed)
    q = torch.randn(batch, q_heads, length, feat, device=CUDA, generator=g).relu().to(dtype)
    k = torch.randn(batch, kv_heads, length, feat, device=CUDA, generator=g).relu().to(dtype)
    v = torch.randn(batch, kv_heads, length, dim, device=CUDA, generator=g).to(dtype)
    s0 = torch.rand(batch, kv_heads, feat, dim, device=CUDA, generator=g) * 10
    z0 = torch.rand(batch, kv_heads, feat, device=CUDA, generator=g) * 10
    return q, k, v, (s0, z0)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 5e-3), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunk_kernel_matches_pytorch_outputs_states_and_gradients(dtype, tol, with_state):
    q, k, v, state = _inputs(dtype)
    state = state if with_state else None
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    num, den, (s1, z1) = fla_numerator_denominator(*leaves, state=state)
    rnum, rden, (rs1, rz1) = chunked_numerator_denominator(*ref_leaves, chunk_size=64, state=state)
    out, ref = normalise(num, den, 1e-2, dtype), normalise(rnum, rden, 1e-2, dtype)
    assert s1.dtype == z1.dtype == torch.float32
    assert _rel(out, ref) < tol
    assert _rel(s1, rs1) < tol and _rel(z1, rz1) < tol
    weight = torch.randn_like(ref, dtype=torch.float32)
    (out.float() * weight).sum().backward()
    (ref.float() * weight).sum().backward()
    for name, a, b in zip("qkv", leaves, ref_leaves):
        assert _rel(a.grad, b.grad) < tol, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recurrent_kernel_step_matches_pytorch(dtype):
    q, k, v, state = _inputs(dtype, length=1)
    num, den, (s1, z1) = fla_numerator_denominator(q, k, v, state=state, recurrent=True)
    rnum, rden, (rs1, rz1) = recurrent_numerator_denominator(q, k, v, state=state)
    assert _rel(normalise(num, den, 1e-2, torch.float32), normalise(rnum, rden, 1e-2, torch.float32)) < 1e-4
    assert _rel(s1, rs1) < 1e-5 and _rel(z1, rz1) < 1e-5  # the step runs in fp32 whatever the model dtype


def _tiny_llama(dtype=torch.float32, feature_dim=32, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # head size 64 and feature size 32, as in the real model: fewer Triton kernel variants to compile
    cfg = dict(vocab_size=128, hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=4096)
    cfg.update(overrides)
    src = LlamaForCausalLM(LlamaConfig(**cfg))
    return T2RForCausalLM.from_softmax_pretrained(src, feature_dim=feature_dim).to(CUDA, dtype).eval()


def _smollm2_shaped(dtype):
    """SmolLM2-135M's architecture with random weights (speed and numerics depend on shapes, not values)."""
    return _tiny_llama(dtype, vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)


@torch.no_grad()
def _logits_fla_and_torch(model, ids):
    """Logits of one forward through fla's kernels and one through the PyTorch path; leaves kernel='fla' set."""
    model.set_kernel("torch")
    ref = model(ids).logits
    model.set_kernel("fla")
    return model(ids).logits, ref


def test_model_logits_generation_and_padding_match_pytorch_path():
    model = _tiny_llama()
    ids = torch.randint(0, 128, (2, 200), device=CUDA)
    out, ref = _logits_fla_and_torch(model, ids)
    assert _rel(out, ref) < 1e-3

    prompt = ids[:1, :37]
    model.set_kernel("torch")
    ref_gen = model.generate(prompt, max_new_tokens=24, do_sample=False, output_logits=True, return_dict_in_generate=True)
    model.set_kernel("fla")
    gen = model.generate(prompt, max_new_tokens=24, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(gen.sequences, ref_gen.sequences)
    assert _rel(torch.stack(gen.logits), torch.stack(ref_gen.logits)) < 1e-3
    with torch.no_grad():  # cached decoding through the kernels == one full forward over the produced sequence
        full = model(gen.sequences).logits[0, 36:-1]
    assert _rel(torch.stack(gen.logits)[:, 0], full) < 1e-3

    short, long = ids[1, :10], ids[0, :25]
    batch = torch.full((2, 25), 0, device=CUDA)
    mask = torch.zeros(2, 25, dtype=torch.long, device=CUDA)
    batch[0, 15:], mask[0, 15:] = short, 1
    batch[1], mask[1] = long, 1
    steps = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)  # both run 12 steps, EOS or not
    together = model.generate(batch, attention_mask=mask, **steps)
    alone = model.generate(short[None], **steps)
    assert torch.equal(together[0, 25:], alone[0, 10:])


@pytest.mark.parametrize("kernel,tol", [("torch", 1e-4), ("fla", 1e-3)])
def test_cached_generation_equals_uncached(kernel, tol):
    """Greedy and beam search with the cache (prefill, then one-token steps through the state) equal generation
    without it (every step a full forward over the whole sequence), on each path."""
    model = _tiny_llama()
    model.set_kernel(kernel)
    prompt = torch.randint(0, 128, (2, 20), device=CUDA)
    kwargs = dict(max_new_tokens=16, do_sample=False, output_logits=True, return_dict_in_generate=True,
                  attention_mask=torch.ones_like(prompt))
    cached = model.generate(prompt, **kwargs)
    uncached = model.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert _rel(torch.stack(cached.logits), torch.stack(uncached.logits)) < tol
    kwargs = dict(max_new_tokens=10, num_beams=3, num_return_sequences=2, do_sample=False)
    assert torch.equal(model.generate(prompt[:1], **kwargs), model.generate(prompt[:1], use_cache=False, **kwargs))


def test_bf16_forward_on_pytorch_path_keeps_fp32_state():
    """A bf16 model on the PyTorch path: the cache's state stays fp32 and finite through prefill and decoding, and
    logits and states stay close to the fp32 model's."""
    model = _tiny_llama()
    model.set_kernel("torch")
    ids = torch.randint(0, 128, (2, 300), device=CUDA)
    with torch.no_grad():
        ref = model(ids[:, :-1], use_cache=True)
        ref_step = model(ids[:, -1:], past_key_values=ref.past_key_values, use_cache=True)
        half = model.to(torch.bfloat16)
        out = half(ids[:, :-1], use_cache=True)
        step = half(ids[:, -1:], past_key_values=out.past_key_values, use_cache=True)
    assert out.logits.dtype == torch.bfloat16
    assert torch.isfinite(out.logits).all() and torch.isfinite(step.logits).all()
    for layer, ref_layer in zip(step.past_key_values.layers, ref_step.past_key_values.layers):
        s, z = layer.state
        assert s.dtype == z.dtype == torch.float32
        assert torch.isfinite(s).all() and torch.isfinite(z).all()
        assert _rel(s, ref_layer.state[0]) < 3e-2 and _rel(z, ref_layer.state[1]) < 3e-2
    assert _rel(out.logits, ref.logits) < 5e-2
    assert _rel(step.logits, ref_step.logits) < 5e-2


def test_bf16_model_training_step_and_long_generation():
    model = _smollm2_shaped(torch.bfloat16)
    ids = torch.randint(0, 49152, (2, 1024), device=CUDA)
    grads = {}
    for kernel in ("torch", "fla"):
        model.set_kernel(kernel)
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
        grads[kernel] = torch.cat([p.grad.float().flatten() for n, p in model.named_parameters() if "feature_map" in n])
    assert torch.isfinite(grads["fla"]).all()
    assert _rel(grads["fla"], grads["torch"]) < 5e-2
    out, ref = _logits_fla_and_torch(model, ids)
    assert _rel(out, ref) < 5e-2

    gen = model.generate(ids[:1, :64], max_new_tokens=300, do_sample=True, top_k=50, return_dict_in_generate=True,
                         output_logits=True)
    assert torch.isfinite(torch.stack(gen.logits)).all()
    layer = gen.past_key_values.layers[0]
    assert layer.state[0].dtype == torch.float32 and torch.isfinite(layer.state[0]).all()


def test_long_prefill_through_chunk_kernel_matches_pytorch():
    model = _smollm2_shaped(torch.bfloat16)
    ids = torch.randint(0, 49152, (1, 16384), device=CUDA)
    states = {}
    with torch.no_grad():
        for kernel in ("torch", "fla"):
            model.set_kernel(kernel)
            out = model(ids, use_cache=True)
            states[kernel] = (out.logits[0, -1].float(), out.past_key_values.layers[-1].state[0])
    assert torch.isfinite(states["fla"][0]).all()
    assert _rel(states["fla"][1], states["torch"][1]) < 3e-2
    assert _rel(states["fla"][0], states["torch"][0]) < 5e-2


def test_window_hybrid_and_softmax_layers_on_cuda_match_cpu():
    """The sliding-window hybrid and a kept softmax layer (PyTorch path) on CUDA: logits equal the CPU model's,
    cached decoding equals the full forward, and bf16 keeps the state fp32 and finite."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    src = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=256, num_hidden_layers=3,
                                       num_attention_heads=4, num_key_value_heads=2))
    cpu = T2RForCausalLM.from_softmax_pretrained(src, feature_dim=32, window_size=16, softmax_layers=[1]).eval()
    ids = torch.randint(0, 128, (2, 150))
    with torch.no_grad():
        expected = cpu(ids).logits
    model = cpu.to(CUDA)
    with torch.no_grad():
        got = model(ids.to(CUDA)).logits
    assert _rel(got.cpu(), expected) < 1e-4
    gen = model.generate(ids[:1, :20].to(CUDA), max_new_tokens=40, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    with torch.no_grad():
        full = model(gen.sequences).logits[0, 19:-1]
    assert _rel(torch.stack(gen.logits)[:, 0], full) < 1e-4
    half = model.to(torch.bfloat16)
    out = half.generate(ids[:1, :64].to(CUDA), max_new_tokens=200, do_sample=True, top_k=50,
                        return_dict_in_generate=True, output_logits=True)
    assert torch.isfinite(torch.stack(out.logits)).all()
    layer = out.past_key_values.layers[0]
    assert layer.state[0].dtype == torch.float32 and layer.ring_keys.shape == (1, 2, 16, 64)
