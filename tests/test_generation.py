"""`generate` runs T2R as an RNN: every mode matches the full forward, in constant memory."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_left_padded_generation_matches_rows_alone, random_ids, tiny_t2r
from transformers import GenerationConfig

from t2r_hf import T2RCache

GREEDY = dict(do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module")
def llama():
    return tiny_t2r("llama")


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "qwen3"])
def test_generate_scores_equal_full_forward(family):
    model = tiny_t2r(family)
    ids = random_ids(2, 7, seed=2)
    out = model.generate(ids, max_new_tokens=12, output_logits=True, return_dict_in_generate=True, **GREEDY)
    assert isinstance(out.past_key_values, T2RCache)
    step_logits = torch.stack(out.logits, dim=1)  # (B, new, V)
    with torch.no_grad():
        full = model(out.sequences, use_cache=False).logits
    torch.testing.assert_close(step_logits, full[:, ids.shape[1] - 1 : -1], atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_left_padded_batch_matches_rows_alone(family):
    assert_left_padded_generation_matches_rows_alone(tiny_t2r(family))


def test_right_padding_is_refused(llama):
    ids = random_ids(2, 6)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    with pytest.raises(ValueError, match="padding_side = 'left'"):
        llama.generate(ids, attention_mask=mask, max_new_tokens=3, **GREEDY)


def test_beam_search_with_and_without_cache(llama):
    ids = random_ids(2, 5, seed=3)
    kwargs = dict(num_beams=4, num_return_sequences=2, max_new_tokens=8, early_stopping=True, **GREEDY)
    cached = llama.generate(ids, use_cache=True, **kwargs)
    uncached = llama.generate(ids, use_cache=False, **kwargs)
    assert cached.shape == (4, 13)
    assert torch.equal(cached, uncached)
    # beams really differ from greedy for at least one row
    greedy = llama.generate(ids, max_new_tokens=8, **GREEDY)
    assert not torch.equal(cached[::2], greedy) or not torch.equal(cached[1::2], cached[::2])


def test_use_cache_false_matches_cached_greedy(llama):
    ids = random_ids(3, 6, seed=4)
    assert torch.equal(
        llama.generate(ids, max_new_tokens=9, use_cache=False, **GREEDY),
        llama.generate(ids, max_new_tokens=9, use_cache=True, **GREEDY),
    )


@pytest.mark.parametrize("options", [dict(temperature=0.7), dict(top_k=5), dict(top_p=0.8, temperature=1.3)],
                         ids=["temperature", "top_k", "top_p"])
def test_sampling_cached_equals_uncached(llama, options):
    ids = random_ids(2, 5, seed=6)
    results = []
    for use_cache in (True, False):
        torch.manual_seed(123)
        results.append(llama.generate(ids, do_sample=True, max_new_tokens=10, use_cache=use_cache, pad_token_id=0,
                                      **options))
    assert torch.equal(results[0], results[1])
    torch.manual_seed(7)
    other = llama.generate(ids, do_sample=True, max_new_tokens=10, pad_token_id=0, **options)
    assert other.shape == results[0].shape


def test_continuation_from_returned_cache(llama):
    ids = random_ids(2, 6, seed=8)
    first = llama.generate(ids, max_new_tokens=5, return_dict_in_generate=True, **GREEDY)
    assert first.past_key_values.get_seq_length() == 6 + 5 - 1
    resumed = llama.generate(first.sequences, past_key_values=first.past_key_values, max_new_tokens=6, **GREEDY)
    assert torch.equal(resumed, llama.generate(ids, max_new_tokens=11, **GREEDY))


def test_forward_cache_continuation_equals_full(llama):
    ids = random_ids(2, 15, seed=9)
    with torch.no_grad():
        full = llama(ids, use_cache=False).logits
        first = llama(ids[:, :8], use_cache=True)
        second = llama(ids[:, 8:], past_key_values=first.past_key_values)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), full, atol=1e-4, rtol=1e-4)
    assert second.past_key_values.get_seq_length() == 15


def test_cache_bytes_constant_in_generated_length(llama):
    ids = random_ids(1, 5)
    short = llama.generate(ids, max_new_tokens=8, min_new_tokens=8, return_dict_in_generate=True, **GREEDY)
    long = llama.generate(ids, max_new_tokens=400, min_new_tokens=400, return_dict_in_generate=True, **GREEDY)
    assert long.sequences.shape[1] == 405
    assert short.past_key_values.nbytes() == long.past_key_values.nbytes() > 0
    layer = long.past_key_values.layers[0]
    assert layer.state_s.shape == (1, 2, 16, 16) and layer.state_s.dtype == torch.float32


def test_assisted_decoding_and_crop_are_refused(llama):
    ids = random_ids(1, 4)
    with pytest.raises(ValueError, match="stateful"):
        llama.generate(ids, assistant_model=tiny_t2r("llama", seed=3), max_new_tokens=3, **GREEDY)
    cache = llama(ids, use_cache=True).past_key_values
    with pytest.raises(ValueError, match="cannot be cropped"):
        cache.crop(1)


def test_kv_cache_implementation_is_refused(llama):
    with pytest.raises(ValueError, match="recurrent state"):
        llama.generate(random_ids(1, 4), cache_implementation="static", max_new_tokens=2, **GREEDY)


def test_generation_config_defaults_are_used(llama):
    llama.generation_config = GenerationConfig(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert llama.generate(random_ids(1, 3)).shape == (1, 7)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 0.1), (torch.float16, 0.02)], ids=["bf16", "fp16"])
def test_half_precision_state_stays_fp32_and_close(dtype, tol):
    """Documented tolerance: max |logit(half) - logit(fp32)| <= 0.1 (bf16) / 0.02 (fp16) on logits of std ~1."""
    fp32 = tiny_t2r("llama")
    half = tiny_t2r("llama").to(dtype)
    ids = random_ids(2, 40)
    with torch.no_grad():
        ref = fp32(ids).logits
        out = half(ids, use_cache=True)
    assert out.past_key_values.layers[0].state_s.dtype == torch.float32
    assert (out.logits.float() - ref).abs().max() <= tol
    long = half.generate(ids[:1], max_new_tokens=300, min_new_tokens=300, output_logits=True,
                         return_dict_in_generate=True, **GREEDY)
    assert all(torch.isfinite(step).all() for step in long.logits)


def test_non_finite_state_raises(llama):
    embeds = llama.get_input_embeddings()(random_ids(1, 4)).detach().clone()
    embeds[0, 2, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="non-finite"):
        llama(inputs_embeds=embeds, use_cache=True)


def test_two_d_padding_mask_required(llama):
    ids = random_ids(1, 4)
    with pytest.raises(ValueError, match="2-D padding mask"):
        llama(ids, attention_mask=torch.ones(1, 1, 4, 4))
