"""Sliding-window hybrid attention and layers kept as softmax: the forms agree, the limits are exact, generation,
padding, beam search and save/reload keep working, and memory stays constant."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import (
    assert_left_padded_generation_matches_rows_alone,
    random_ids,
    recurrent_logits,
    set_chunk_size,
    tiny_source,
    tiny_t2r,
)
from transformers import AutoModelForCausalLM

from t2r_hf import T2RCache, T2RConfig, T2RForCausalLM
from t2r_hf.cache import T2RSoftmaxLayer, T2RStateLayer
from t2r_hf.ops import (
    hybrid_numerator_denominator,
    normalise,
    softmax_attention,
    window_attention_naive,
)
from t2r_hf.transfer import attention_transfer, transfer_losses

GREEDY = dict(do_sample=False, pad_token_id=0)
EPS = 1e-2


def _op_inputs(batch=2, q_heads=4, kv_heads=2, length=37, dim=8, feat=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, length, dim, generator=g)
    k = torch.randn(batch, kv_heads, length, dim, generator=g)
    v = torch.randn(batch, kv_heads, length, dim, generator=g)
    proj = torch.randn(dim, feat, generator=g) / dim**0.5
    factor = torch.rand(q_heads, generator=g) * 0.8 + 0.1
    valid = torch.ones(batch, length, dtype=torch.bool)
    valid[1, :5] = False  # a left-padded row
    return q, k, v, (lambda x: torch.relu(x @ proj)), factor, valid


def _hybrid(q, k, v, fmap, factor, valid, window, chunk_size=64, state=None, ring=None):
    num, den, state, ring = hybrid_numerator_denominator(
        q, fmap(q), k, v, fmap, window, 0.35, factor, valid=valid, state=state, ring=ring, chunk_size=chunk_size
    )
    return normalise(num, den, EPS, v.dtype), state, ring


@pytest.mark.parametrize("window", [1, 4, 16])
def test_parallel_chunked_and_recurrent_window_attention_agree(window):
    q, k, v, fmap, factor, valid = _op_inputs()
    reference = window_attention_naive(q, k, v, fmap(q), fmap(k), window, 0.35, factor, EPS, valid)
    for chunk_size in (1, 5, 64):
        chunked, _, _ = _hybrid(q, k, v, fmap, factor, valid, window, chunk_size)
        torch.testing.assert_close(chunked, reference, atol=2e-6, rtol=2e-5)
    state = ring = None
    steps = []
    for t in range(q.shape[2]):
        s = slice(t, t + 1)
        y, state, ring = _hybrid(q[:, :, s], k[:, :, s], v[:, :, s], fmap, factor, valid[:, s], window,
                                 state=state, ring=ring)
        steps.append(y)
    torch.testing.assert_close(torch.cat(steps, 2), reference, atol=2e-6, rtol=2e-5)
    # a prefill continued in uneven pieces gives the same outputs and the same final state and ring
    state = ring = None
    pieces = []
    for start, stop in [(0, 3), (3, 20), (20, 21), (21, 37)]:
        s = slice(start, stop)
        y, state, ring = _hybrid(q[:, :, s], k[:, :, s], v[:, :, s], fmap, factor, valid[:, s], window, 4,
                                 state=state, ring=ring)
        pieces.append(y)
    torch.testing.assert_close(torch.cat(pieces, 2), reference, atol=2e-6, rtol=2e-5)
    _, whole_state, whole_ring = _hybrid(q, k, v, fmap, factor, valid, window)
    for a, b in zip(state + ring, whole_state + whole_ring):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert ring[0].shape == (2, 2, window, 8)


def test_window_covering_the_sequence_is_softmax_attention():
    q, k, v, fmap, factor, _ = _op_inputs(length=20)
    softmax = softmax_attention(q, k, v, 0.35).transpose(1, 2)
    for window in (20, 64):
        y, _, _ = _hybrid(q, k, v, fmap, factor, None, window)
        torch.testing.assert_close(y, softmax, atol=1e-6, rtol=1e-5)
    # one position short of the sequence, the oldest key goes through the feature map instead: not softmax
    y, _, _ = _hybrid(q, k, v, fmap, factor, None, 19)
    assert (y[:, :, -1] - softmax[:, :, -1]).abs().max() > 1e-3
    torch.testing.assert_close(y[:, :, :-1], softmax[:, :, :-1], atol=1e-6, rtol=1e-5)


def test_softmax_attention_masks_match_an_explicit_reference():
    g = torch.Generator().manual_seed(3)
    q, keys, values = torch.randn(2, 4, 5, 8, generator=g), torch.randn(2, 2, 12, 8, generator=g), \
        torch.randn(2, 2, 12, 8, generator=g)
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[0, :3] = False
    out = softmax_attention(q, keys, values, 0.3, valid, sliding_window=4)
    kk, vv = keys.repeat_interleave(2, 1), values.repeat_interleave(2, 1)
    scores = torch.einsum("bhtd,bhsd->bhts", q, kk) * 0.3
    i, j = torch.arange(7, 12)[:, None], torch.arange(12)[None]
    allowed = (j <= i) & (j > i - 4) & valid[:, None, None, :]
    expected = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ vv
    torch.testing.assert_close(out, expected.transpose(1, 2), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "qwen3"])
def test_model_with_window_over_the_whole_input_equals_the_source(family):
    source = tiny_source(family)
    ids = random_ids(2, 24, seed=1)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding: compare the real positions
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as T2R derives them (GPT-2 itself would not)
    with torch.no_grad():
        expected = source(ids, attention_mask=mask, position_ids=positions).logits
        model = T2RForCausalLM.from_softmax_pretrained(copy.deepcopy(source), feature_dim=8, window_size=32).eval()
        got = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got[1, 7:], expected[1, 7:], atol=1e-5, rtol=1e-4)


def test_all_but_one_layer_softmax_and_a_covering_window_equal_the_source():
    source = tiny_source("llama", num_hidden_layers=3)
    model = T2RForCausalLM.from_softmax_pretrained(copy.deepcopy(source), feature_dim=8, window_size=64,
                                                   softmax_layers=[0, 2]).eval()
    ids = random_ids(2, 30, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, source(ids).logits, atol=1e-5, rtol=1e-4)
    assert [type(layer) for layer in T2RCache(model.config).layers] == [T2RSoftmaxLayer, T2RStateLayer,
                                                                        T2RSoftmaxLayer]
    assert len(model.t2r_parameters()) == 3  # one feature map (weight, bias) and one window factor
    assert not hasattr(model.model.layers[0].self_attn, "feature_map")


@pytest.fixture(scope="module")
def hybrid():
    """Llama, 2 layers: layer 0 a window-4 hybrid (window factors spread out), layer 1 kept as softmax."""
    model = tiny_t2r("llama", window_size=4, softmax_layers=[1])
    with torch.no_grad():
        for attn in model._feature_map_owners:
            attn.window_factor.logit.copy_(torch.linspace(-2.0, 2.0, attn.window_factor.num_heads))
    return model


@pytest.fixture(scope="module")
def hybrid3():
    source = tiny_source("llama", num_hidden_layers=3)
    torch.manual_seed(1)
    return T2RForCausalLM.from_softmax_pretrained(source, feature_dim=16, window_size=4, softmax_layers=[1]).eval()


@pytest.mark.parametrize("name", ["hybrid", "hybrid3"])
def test_full_forward_equals_token_by_token_and_chunk_sizes(name, request):
    model = request.getfixturevalue(name)
    ids = random_ids(2, 21, seed=4)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        for chunk in (3, 64):
            other = copy.deepcopy(model)
            set_chunk_size(other, chunk)
            torch.testing.assert_close(other(ids).logits, full, atol=1e-5, rtol=1e-4)
        first = model(ids[:, :9], use_cache=True)
        second = model(ids[:, 9:], past_key_values=first.past_key_values)
    torch.testing.assert_close(recurrent_logits(model, ids), full, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), full, atol=1e-5, rtol=1e-4)


def test_generate_cached_equals_uncached_and_full_forward(hybrid):
    ids = random_ids(2, 6, seed=5)
    out = hybrid.generate(ids, max_new_tokens=12, output_logits=True, return_dict_in_generate=True, **GREEDY)
    assert isinstance(out.past_key_values, T2RCache)
    assert torch.equal(out.sequences, hybrid.generate(ids, max_new_tokens=12, use_cache=False, **GREEDY))
    with torch.no_grad():
        full = hybrid(out.sequences, use_cache=False).logits
    torch.testing.assert_close(torch.stack(out.logits, 1), full[:, 5:-1], atol=1e-4, rtol=1e-4)


def test_sampling_cached_equals_uncached(hybrid):
    ids = random_ids(2, 5, seed=6)
    results = []
    for use_cache in (True, False):
        torch.manual_seed(11)
        results.append(hybrid.generate(ids, do_sample=True, top_k=10, max_new_tokens=10, use_cache=use_cache,
                                       pad_token_id=0))
    assert torch.equal(*results)


def test_left_padded_batch_matches_rows_alone(hybrid):
    assert_left_padded_generation_matches_rows_alone(hybrid, lengths=(9, 3, 6))


def test_beam_search_with_and_without_cache(hybrid):
    ids = random_ids(2, 5, seed=3)
    kwargs = dict(num_beams=4, num_return_sequences=2, max_new_tokens=8, early_stopping=True, **GREEDY)
    cached = hybrid.generate(ids, use_cache=True, **kwargs)
    assert cached.shape == (4, 13)
    assert torch.equal(cached, hybrid.generate(ids, use_cache=False, **kwargs))


def test_cache_bytes_constant_after_the_window_without_softmax_layers():
    model = tiny_t2r("llama", window_size=8)
    ids = random_ids(1, 3)
    sizes = {}
    for new in (20, 200):
        out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, return_dict_in_generate=True, **GREEDY)
        sizes[new] = out.past_key_values.nbytes()
    layer = out.past_key_values.layers[0]
    assert sizes[20] == sizes[200]
    # per layer: S (1, 2, 16, 16) and z (1, 2, 16) in fp32, plus the ring: keys and values (1, 2, 8, 16) fp32
    # and 8 validity flags
    assert layer.nbytes() == 4 * (2 * 16 * 16 + 2 * 16) + 2 * 4 * (2 * 8 * 16) + 8
    assert layer.ring_keys.shape == (1, 2, 8, 16) and bool(layer.ring_valid.all())


def test_softmax_layer_cache_grows_and_the_others_do_not(hybrid):
    ids = random_ids(1, 3)
    caches = [hybrid.generate(ids, max_new_tokens=n, min_new_tokens=n, return_dict_in_generate=True,
                              **GREEDY).past_key_values for n in (10, 50)]
    kinds = [[type(layer) for layer in cache.layers] for cache in caches]
    assert kinds[0] == kinds[1] == [T2RStateLayer, T2RSoftmaxLayer]
    assert caches[0].layers[0].nbytes() == caches[1].layers[0].nbytes()
    assert caches[1].layers[1].keys.shape[2] == 3 + 50 - 1 and caches[0].layers[1].keys.shape[2] == 3 + 10 - 1


def test_save_reload_with_package_and_remote_code(hybrid, tmp_path):
    from test_save_load import _BLOCK_T2R, _run_child

    hybrid.save_pretrained(tmp_path / "m")
    ids = random_ids(2, 11, seed=7)
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        expected = hybrid(ids).logits
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert loaded.config.window_size == 4 and loaded.config.softmax_layers == [1]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, atol=0, rtol=0)
    assert torch.equal(loaded.generate(ids, max_new_tokens=6, **GREEDY), hybrid.generate(ids, max_new_tokens=6,
                                                                                          **GREEDY))
    card = (tmp_path / "m" / "README.md").read_text()
    assert "| window_size | 4 |" in card and "Layers [1] keep their original softmax attention" in card
    _run_child(_BLOCK_T2R + f"""
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "m")!r}, trust_remote_code=True).eval()
assert "t2r_hf" not in type(model).__module__
ids = torch.load({str(tmp_path / "ids.pt")!r})
with torch.no_grad():
    torch.save(model(ids).logits, {str(tmp_path / "remote.pt")!r})
torch.save(model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0), {str(tmp_path / "gen.pt")!r})
""", {"HF_MODULES_CACHE": str(tmp_path / "modules")})
    torch.testing.assert_close(torch.load(tmp_path / "remote.pt"), expected, atol=0, rtol=0)
    assert torch.equal(torch.load(tmp_path / "gen.pt"), hybrid.generate(ids, max_new_tokens=6, **GREEDY))


def test_missing_window_factor_weights_is_an_error(hybrid, tmp_path):
    from safetensors.torch import load_file, save_file

    hybrid.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "window_factor" not in k}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match="window_factor"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_transfer_trains_feature_maps_and_window_factors_only():
    model = tiny_t2r("llama", window_size=4, softmax_layers=[0])
    source_before = {k: v.clone() for k, v in model.state_dict().items()}
    blocks = random_ids(4, 32, seed=9)
    with torch.no_grad():
        before = transfer_losses(model, blocks[:2])
    history = attention_transfer(model, blocks, max_steps=30, learning_rate=3e-2, batch_size=2, progress=False)
    assert len(history[0]) == len(model.config.linear_layers) == 1 == len(before)
    with torch.no_grad():
        after = transfer_losses(model, blocks[:2])
    assert after.sum() < 0.8 * before.sum()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, source_before[k])}
    assert any(".window_factor." in k for k in changed) and any(".feature_map." in k for k in changed)
    assert all(".window_factor." in k or ".feature_map." in k for k in changed)


def test_finetuning_reaches_window_factors_and_softmax_layers(hybrid3):
    model = copy.deepcopy(hybrid3).train()
    ids = random_ids(2, 16, seed=10)
    model(ids, labels=ids).loss.backward()
    attn = model.model.layers
    assert attn[0].self_attn.window_factor.logit.grad.abs().sum() > 0
    assert attn[1].self_attn.q_proj.weight.grad.abs().sum() > 0  # the softmax layer trains as usual


def test_lora_trains_window_factors_in_full_and_merges(hybrid):
    from t2r_hf.finetune import apply_lora

    peft_model = apply_lora(copy.deepcopy(hybrid))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any("window_factor" in n for n in trainable) and any("lora_A" in n for n in trainable)
    ids = random_ids(2, 12, seed=12)
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=1.0)
    peft_model(ids, labels=ids).loss.backward()
    optimizer.step()
    merged = peft_model.merge_and_unload()
    assert isinstance(merged, T2RForCausalLM)
    logit = merged.model.layers[0].self_attn.window_factor.logit
    assert not torch.equal(logit, hybrid.model.layers[0].self_attn.window_factor.logit)
    with torch.no_grad():  # the merged model still decodes as it computes in parallel
        torch.testing.assert_close(recurrent_logits(merged.eval(), ids), merged(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(window_size=-1), "window_size"),
        (dict(window_size=2.5), "window_size"),
        (dict(softmax_layers=[2]), "out of range"),
        (dict(softmax_layers=[-1]), "out of range"),
        (dict(softmax_layers=[0, 0]), "twice"),
        (dict(softmax_layers=[0, 1]), "nothing would be converted"),
        (dict(softmax_layers=3), "list of layer indices"),
        (dict(window_size=8, kernel="fla"), "pure T2R layers only"),
    ],
)
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        T2RForCausalLM.from_softmax_pretrained(tiny_source("llama"), feature_dim=8, **options)
    with pytest.raises(ValueError, match=message):
        T2RConfig(source_config=tiny_source("llama").config.to_dict(), **options)


def test_cache_of_the_wrong_layer_kinds_is_refused(hybrid):
    with pytest.raises(TypeError, match=r"T2RCache\(model.config\)"):
        hybrid(random_ids(1, 4), past_key_values=T2RCache(num_layers=2), use_cache=True)


def test_fla_kernel_is_refused_on_a_window_model(hybrid):
    with pytest.raises(ValueError, match="sliding window"):
        copy.deepcopy(hybrid).set_kernel("fla")
