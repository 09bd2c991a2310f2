"""Conversion of every supported family: weights kept, only feature maps added, all forms agree."""

from __future__ import annotations

import pytest
import torch
from helpers import FAMILIES, random_ids, recurrent_logits, set_chunk_size, tiny_source, tiny_t2r
from transformers import BertConfig, BertModel, T5Config, T5ForConditionalGeneration

from t2r_hf import T2RConfig, T2RForCausalLM

FAMILY_IDS = sorted(FAMILIES)


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_source_weights_kept_and_only_feature_maps_added(family):
    source = tiny_source(family)
    before = {k: v.clone() for k, v in source.state_dict().items()}
    model = T2RForCausalLM.from_softmax_pretrained(source, feature_dim=8)
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    added = set(after) - set(before)
    layers = model.config.num_hidden_layers
    assert added and all(".feature_map." in k for k in added)
    assert len(added) == 2 * layers  # weight and bias per layer
    assert {k.split(".feature_map.")[0] for k in added}.__len__() == layers
    assert model.config.model_type == "t2r" and model.config.source_model_type == family


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_parallel_chunked_recurrent_logits_agree(family):
    model = tiny_t2r(family)
    ids = random_ids(2, 21, seed=1)
    with torch.no_grad():
        set_chunk_size(model, 64)  # one chunk: the quadratic parallel form
        parallel = model(ids, use_cache=False).logits
        set_chunk_size(model, 4)  # several chunks carried through the state
        chunked = model(ids, use_cache=False).logits
    recurrent = recurrent_logits(model, ids)
    assert torch.isfinite(parallel).all()
    torch.testing.assert_close(chunked, parallel, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(recurrent, parallel, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_t2r_output_differs_from_softmax(family):
    """The swap really happened: logits are not the softmax model's."""
    source = tiny_source(family)
    ids = random_ids(1, 12)
    with torch.no_grad():
        softmax_logits = source(ids).logits.clone()
        t2r_logits = T2RForCausalLM.from_softmax_pretrained(source, feature_dim=8)(ids).logits
    assert not torch.allclose(softmax_logits, t2r_logits, atol=1e-3)


@pytest.mark.parametrize("feature_map", ["t2r", "elu", "hedgehog"])
def test_feature_maps_agree_across_forms(feature_map):
    model = tiny_t2r("llama", feature_map=feature_map)
    ids = random_ids(1, 11)
    with torch.no_grad():
        set_chunk_size(model, 3)
        chunked = model(ids, use_cache=False).logits
    torch.testing.assert_close(recurrent_logits(model, ids), chunked, atol=1e-4, rtol=1e-4)
    n_added = sum(p.numel() for p in model.feature_map_parameters())
    assert n_added == (0 if feature_map == "elu" else 2 * 2 * (16 * 16 + 16))  # layers * kv heads * (k*d + k)


def test_loss_from_labels():
    model = tiny_t2r("llama")
    ids = random_ids(2, 10)
    out = model(ids, labels=ids)
    logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    expected = torch.nn.functional.cross_entropy(logits, ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert all(p.grad is not None for p in model.feature_map_parameters())


def test_base_model_returns_hidden_states():
    from t2r_hf import T2RModel

    source = tiny_source("llama")
    config = T2RConfig(source_config=source.config.to_dict(), feature_dim=8)
    model = T2RModel(config).eval()
    out = model(random_ids(2, 7))
    assert out.last_hidden_state.shape == (2, 7, 64)
    assert out.past_key_values.get_seq_length() == 7


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                  intermediate_size=64)), id="encoder-only"),
        pytest.param(lambda: T5ForConditionalGeneration(T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2,
                                                                 d_kv=16)), id="encoder-decoder"),
    ],
)
def test_unsupported_architecture_lists_supported(make):
    with pytest.raises(ValueError, match="llama.*qwen3") as err:
        T2RForCausalLM.from_softmax_pretrained(make(), feature_dim=8)
    assert "gpt2" in str(err.value) and "gpt_neox" in str(err.value)


def test_unsupported_architecture_from_folder_fails_before_loading(tmp_path):
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
              ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'bert'"):
        T2RForCausalLM.from_softmax_pretrained(str(tmp_path))


def test_backbone_without_head_is_refused():
    from transformers import LlamaModel

    with pytest.raises(ValueError, match="language-modeling head"):
        T2RForCausalLM.from_softmax_pretrained(LlamaModel(tiny_source("llama").config))


@pytest.mark.parametrize(
    "options,field",
    [
        ({"feature_dim": 0}, "feature_dim"),
        ({"feature_dim": 2.5}, "feature_dim"),
        ({"feature_map": "cosine"}, "feature_map"),
        ({"eps": 0.0}, "eps"),
        ({"eps": -1}, "eps"),
        ({"chunk_size": 0}, "chunk_size"),
    ],
)
def test_invalid_options_raise(options, field):
    options = {"feature_dim": 8, **options}
    with pytest.raises(ValueError, match=field):
        T2RForCausalLM.from_softmax_pretrained(tiny_source("llama"), **options)


def test_loader_kwargs_with_loaded_model_are_refused():
    with pytest.raises(TypeError, match="revision"):
        T2RForCausalLM.from_softmax_pretrained(tiny_source("llama"), feature_dim=8, revision="main")


def test_config_without_source_is_an_error():
    with pytest.raises(ValueError, match="source_config"):
        T2RConfig(source_config={"hidden_size": 3})
    with pytest.raises(ValueError, match="source_config"):
        T2RConfig().get_source_config()


def test_cache_type_is_checked():
    from transformers import DynamicCache

    model = tiny_t2r("llama")
    with pytest.raises(TypeError, match="T2RCache"):
        model(random_ids(1, 4), past_key_values=DynamicCache())
