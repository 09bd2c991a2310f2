"""`generate(..., compile_config=CompileConfig(mode="default"))` compiles T2R's decoding step: the same tokens and
scores as eager decoding, one graph per step with no break inside the layers, CUDA-graph modes refused, and the
finite-state check still firing once per step."""

from __future__ import annotations

import pytest
import torch
from helpers import random_ids, tiny_t2r
from torch._dynamo.utils import counters
from transformers import CompileConfig

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


def test_non_finite_state_is_reported_once_per_step_with_its_layers():
    model = tiny_t2r("llama")
    embeds = model.get_input_embeddings()(random_ids(1, 4)).detach().clone()
    embeds[0, 2, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"layer\(s\) 0, 1 became non-finite"):
        model(inputs_embeds=embeds, use_cache=True)
    # A finite forward after a reset passes the same check.
    out = model(random_ids(1, 4), use_cache=True)
    out.past_key_values.check_finite()
    assert all(bool(layer.state_finite) for layer in out.past_key_values.layers)
