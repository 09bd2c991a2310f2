"""Shared helpers: tiny seeded source models of every supported family, and logits utilities."""

from __future__ import annotations

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

VOCAB = 128
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)

FAMILIES = {
    # GQA 4 query heads over 2 key/value heads wherever the family has it
    "llama": (LlamaForCausalLM, lambda: LlamaConfig(**_COMMON, num_key_value_heads=2, attention_bias=True)),
    "mistral": (MistralForCausalLM, lambda: MistralConfig(**_COMMON, num_key_value_heads=2, sliding_window=None)),
    "qwen2": (Qwen2ForCausalLM, lambda: Qwen2Config(**_COMMON, num_key_value_heads=2)),
    "qwen3": (Qwen3ForCausalLM, lambda: Qwen3Config(**_COMMON, num_key_value_heads=2, head_dim=16)),
    "gpt2": (GPT2LMHeadModel, lambda: GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=512)),
    "gpt_neox": (
        GPTNeoXForCausalLM,
        lambda: GPTNeoXConfig(**_COMMON, max_position_embeddings=512, rotary_pct=0.5),
    ),
}


def tiny_source(family: str, seed: int = 0, **overrides):
    """A randomly initialised, seeded source causal LM of `family`, in eval mode, fp32."""
    cls, make_config = FAMILIES[family]
    config = make_config()
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    return cls(config).eval()


def tiny_t2r(family: str, seed: int = 0, feature_dim: int = 16, **options):
    """A T2R model converted from `tiny_source(family, seed)` with seeded feature maps."""
    from t2r_hf import T2RForCausalLM

    source = tiny_source(family, seed)
    torch.manual_seed(seed + 1)
    return T2RForCausalLM.from_softmax_pretrained(source, feature_dim=feature_dim, **options).eval()


def random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


@torch.no_grad()
def recurrent_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits computed one token at a time through the recurrent cache."""
    cache, outs = None, []
    for t in range(input_ids.shape[1]):
        out = model(input_ids[:, t : t + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        outs.append(out.logits)
    return torch.cat(outs, dim=1)


def set_chunk_size(model, chunk_size: int) -> None:
    """Change the chunk size of every T2R attention of `model` (and its config)."""
    model.config.chunk_size = chunk_size
    for attn in model._feature_map_owners:
        attn.t2r_chunk_size = chunk_size


def assert_left_padded_generation_matches_rows_alone(model, lengths=(9, 4, 6), new_tokens: int = 10) -> None:
    """Greedy generation of a left-padded batch gives every row exactly what it gives that row alone."""
    rows = [random_ids(1, n, seed=n)[0] for n in lengths]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    greedy = dict(do_sample=False, pad_token_id=0, max_new_tokens=new_tokens)
    batched = model.generate(ids, attention_mask=mask, **greedy)
    for i, r in enumerate(rows):
        alone = model.generate(r[None], **greedy)
        assert torch.equal(batched[i, width:], alone[0, len(r) :]), f"row {i}"
