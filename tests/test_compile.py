"""`generate(..., compile_config=CompileConfig(mode="default"))` compiles T2R's decoding step: the same tokens and
scores as eager decoding, no graph break inside the layers, CUDA-graph modes and fullgraph refused, compile skipped
with a warning where it cannot work, and the finite-state check still firing (once per forward) under compile."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import random_ids, tiny_t2r
from torch._dynamo.utils import counters
from transformers import CompileConfig
from transformers.testing_utils import CaptureLogger

import t2r_hf.modeling_t2r

GREEDY = dict(do_sample=False, pad_token_id=0, max_new_tokens=8, output_scores=True, return_dict_in_generate=True)


@pytest.mark.parametrize(
    "backend, options",
    [("inductor", {}), ("aot_eager", dict(window_size=4, softmax_layers=[1]))],
    ids=["pure-inductor", "window-and-softmax-layer-aot_eager"],
)
def test_compiled_decoding_equals_eager(backend, options):
    model = tiny_t2r("llama", **options)
    ids = random_ids(2, 7, seed=3)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding goes through the compiled step as a mask
    eager = model.generate(ids, attention_mask=mask, **GREEDY)
    assert not hasattr(model, "_compiled_call"), "generate compiled without being asked to"

    torch._dynamo.reset()
    counters.clear()
    compiled = model.generate(ids, attention_mask=mask, compile_config=CompileConfig(mode="default", backend=backend),
                              **GREEDY)
    assert hasattr(model, "_compiled_call")
    assert counters["stats"]["unique_graphs"] >= 1, "nothing was compiled"
    breaks = [reason for reason in counters["graph_break"] if "check_finite" not in reason]
    assert not breaks, f"graph breaks inside the decoding step: {breaks}"
    assert torch.equal(eager.sequences, compiled.sequences)
    torch.testing.assert_close(torch.stack(compiled.scores), torch.stack(eager.scores), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_cuda_graph_compile_modes_are_refused(mode):
    model = tiny_t2r("llama")
    with pytest.raises(ValueError, match="CUDA graphs.*mode='default'"):
        model.generate(random_ids(1, 4), compile_config=CompileConfig(mode=mode), **GREEDY)


def test_non_finite_state_names_its_layers_and_the_flags_follow_the_cache():
    model = tiny_t2r("llama")
    embeds = model.get_input_embeddings()(random_ids(1, 4)).detach().clone()
    embeds[0, 2, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"layer\(s\) 0, 1 became non-finite"):
        model(inputs_embeds=embeds, use_cache=True)
    # A finite forward on a new cache passes the same check; reordering keeps the flags, a reset clears them.
    cache = model(random_ids(2, 4), use_cache=True).past_key_values
    cache.check_finite()
    assert all(bool(layer.state_finite) for layer in cache.layers)
    cache.reorder_cache(torch.tensor([1, 0]))
    cache.check_finite()
    cache.reset()
    assert all(layer.state_finite is None for layer in cache.layers)
    cache.check_finite()  # nothing to check after a reset


def test_non_finite_state_raises_inside_a_compiled_decoding_step():
    model = tiny_t2r("llama")
    ids = random_ids(1, 5)
    cache = model(ids[:, :4], use_cache=True).past_key_values  # eager prefill
    torch._dynamo.reset()
    step = torch.compile(model.forward, mode="default", backend="aot_eager")
    position = torch.tensor([[4]])
    step(ids[:, 4:], past_key_values=cache, position_ids=position, use_cache=True)  # compiles, finite: passes
    cache.layers[1].state_s[0, 0, 0, 0] = float("inf")  # corrupt one layer's state between steps
    with pytest.raises(FloatingPointError, match=r"layer\(s\) 1 became non-finite"):
        step(ids[:, 4:], past_key_values=cache, position_ids=position + 1, use_cache=True)


def test_fullgraph_is_refused():
    model = tiny_t2r("llama")
    with pytest.raises(ValueError, match="fullgraph=True.*fullgraph=False"):
        model.generate(random_ids(1, 4), compile_config=CompileConfig(mode="default", fullgraph=True), **GREEDY)


def test_compile_without_a_cache_is_skipped_with_a_warning():
    model = tiny_t2r("llama")
    logging.Logger.warning_once.cache_clear()  # the warning may have been given once already in this process
    with CaptureLogger(t2r_hf.modeling_t2r.logger) as captured:
        out = model.generate(random_ids(1, 4), compile_config=CompileConfig(mode="default"), use_cache=False,
                             **GREEDY)
    assert "compile_config ignored" in captured.out and "use_cache=False" in captured.out
    assert not hasattr(model, "_compiled_call")
    assert out.sequences.shape == (1, 12)
