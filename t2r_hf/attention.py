"""The attention swap: T2R linear attention inside the source family's own attention modules.

Every supported family computes queries, keys and values with its pretrained projections (biases, rotary or
absolute positions, QK-norms included) and then calls the attention *function* registered under
`config._attn_implementation`. A T2R model sets that to `"t2r"`, registered here as `t2r_attention_forward`,
and gives each attention module a `feature_map` child. So the source parameters keep their names and values,
the only new parameters are the feature maps, and the source's forward (embeddings, norms, MLPs, heads) runs
unchanged.

Two options change a layer's form (see `ops.py` for the formulas): with `window_size = W > 0` every converted
layer is a sliding-window hybrid (softmax over the last `W` keys, linear attention beyond, one normaliser, a
learned per-head `window_factor`), and the layers listed in `softmax_layers` keep their exact softmax attention
with an ordinary key/value cache (they get no feature map).

The recurrent state does not go through the family's KV-cache plumbing (which would store a growing history):
the T2R model calls the source model without a cache and hands the `T2RCache` and the padding mask to the
attention function through keyword arguments (`t2r_cache`, `t2r_padding_mask`), which every supported family
forwards untouched from the model's forward to the attention function.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.utils import logging

from .cache import T2RSoftmaxLayer
from .feature_maps import WindowFactor, build_feature_map
from .kernels import fla_numerator_denominator, select_kernel
from .ops import (
    chunked_numerator_denominator,
    hybrid_numerator_denominator,
    normalise,
    recurrent_numerator_denominator,
    softmax_attention,
)

logger = logging.get_logger(__name__)

ATTN_IMPLEMENTATION = "t2r"

# model_type -> name of the attention child of each decoder layer. Each family listed here is tested.
SUPPORTED_FAMILIES: dict[str, str] = {
    "llama": "self_attn",
    "mistral": "self_attn",
    "qwen2": "self_attn",
    "qwen3": "self_attn",
    "gpt2": "attn",
    "gpt_neox": "attention",
}


def check_supported(source_config) -> None:
    """Raise a `ValueError` naming the supported families if `source_config` is not one of them."""
    model_type = getattr(source_config, "model_type", None)
    if getattr(source_config, "is_encoder_decoder", False) or model_type not in SUPPORTED_FAMILIES:
        kind = "an encoder-decoder model" if getattr(source_config, "is_encoder_decoder", False) else "not supported"
        raise ValueError(
            f"Cannot convert a model of type {model_type!r} ({kind}). T2R converts decoder-only causal language "
            f"models of these families: {', '.join(sorted(SUPPORTED_FAMILIES))}."
        )


def head_geometry(source_config) -> tuple[int, int, int]:
    """`(num_query_heads, num_kv_heads, head_dim)` of the source attention."""
    num_heads = source_config.num_attention_heads
    num_kv = getattr(source_config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(source_config, "head_dim", None) or source_config.hidden_size // num_heads
    return num_heads, num_kv, head_dim


def find_attention_modules(model: nn.Module, source_config) -> list[nn.Module]:
    """The attention module of every decoder layer of `model`, in layer order."""
    attr = SUPPORTED_FAMILIES[source_config.model_type]
    found = {}
    for module in model.modules():
        attn = getattr(module, attr, None)
        if isinstance(attn, nn.Module) and getattr(attn, "layer_idx", None) is not None:
            found[attn.layer_idx] = attn
    if sorted(found) != list(range(source_config.num_hidden_layers)):
        raise ValueError(
            f"Expected one `{attr}` attention per layer for {source_config.num_hidden_layers} layers of "
            f"{source_config.model_type!r}, found layers {sorted(found)}."
        )
    return [found[i] for i in range(source_config.num_hidden_layers)]


def attach_feature_maps(model: nn.Module, source_config, t2r_config) -> list[nn.Module]:
    """Give every converted attention module of `model` a `feature_map` (and, with a sliding window, a
    `window_factor`) and the T2R options; mark the `softmax_layers` as kept; switch `model` to `"t2r"`.

    Returns the converted modules (those with a feature map), in layer order."""
    check_supported(source_config)
    num_heads, num_kv, head_dim = head_geometry(source_config)
    modules = find_attention_modules(model, source_config)
    keep_softmax = set(getattr(t2r_config, "softmax_layers", None) or ())
    window = int(getattr(t2r_config, "window_size", 0) or 0)
    converted = []
    for index, attn in enumerate(modules):
        attn.t2r_softmax = index in keep_softmax
        attn.t2r_window = 0 if attn.t2r_softmax else window
        attn.t2r_eps = float(t2r_config.eps)
        attn.t2r_chunk_size = int(t2r_config.chunk_size)
        attn.t2r_kernel = t2r_config.kernel
        if attn.t2r_softmax:
            continue
        attn.feature_map = build_feature_map(t2r_config.feature_map, num_kv, head_dim, t2r_config.feature_dim)
        if window:
            attn.window_factor = WindowFactor(num_heads)
        converted.append(attn)
    source_config._attn_implementation = ATTN_IMPLEMENTATION
    return converted


def _padding_valid(mask: torch.Tensor | None, key: torch.Tensor) -> torch.Tensor:
    """(B, T) bool validity of the new positions (all True without a padding mask)."""
    if mask is None:
        return torch.ones(key.shape[0], key.shape[2], dtype=torch.bool, device=key.device)
    return mask.bool()


def _softmax_layer_forward(module, query, key, value, layer, padding_mask, kwargs) -> tuple[torch.Tensor, None]:
    """A layer kept as softmax attention: the exact attention over its own growing key/value cache."""
    scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
    valid = _padding_valid(padding_mask, key)
    if layer is not None:
        key, value, valid = layer.append(key, value, valid)
    if not torch.compiler.is_compiling() and bool(valid.all()):  # kept under compile: same result, no sync
        valid = None
    dropout = kwargs.get("dropout", 0.0) if module.training else 0.0
    out = softmax_attention(query, key, value, scaling, valid, kwargs.get("sliding_window"), dropout)
    return out.contiguous(), None


def _window_forward(module, query, key, value, q_feat, layer, padding_mask, kwargs) -> torch.Tensor:
    """A sliding-window hybrid layer: returns the normalised output (B, Hq, T, D)."""
    scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
    state = layer.state if layer is not None else None
    ring = layer.ring if layer is not None else None
    num, den, new_state, new_ring = hybrid_numerator_denominator(
        query,
        q_feat,
        key,
        value,
        module.feature_map,
        module.t2r_window,
        scaling,
        module.window_factor(),
        valid=padding_mask,
        state=state,
        ring=ring,
        chunk_size=module.t2r_chunk_size,
    )
    if layer is not None:
        layer.update_state(new_state, query.shape[2])
        layer.update_ring(new_ring)
    return normalise(num, den, module.t2r_eps, value.dtype)


def t2r_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    t2r_cache=None,
    t2r_padding_mask: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal T2R linear attention with the module's feature map; the `"t2r"` attention implementation.

    query: (B, Hq, T, D); key, value: (B, Hkv, T, D); t2r_padding_mask: (B, T), 1 for real tokens.
    Returns the output as (B, T, Hq, D), like the other attention functions, and no attention weights.
    Layers kept as softmax and sliding-window layers take their own paths (see the module docstring).
    """
    layer = t2r_cache.layers[module.layer_idx] if t2r_cache is not None else None
    if layer is not None and isinstance(layer, T2RSoftmaxLayer) != getattr(module, "t2r_softmax", False):
        raise TypeError(
            f"Layer {module.layer_idx} of this cache is a {type(layer).__name__}, which does not match the model's "
            "layer kinds (`softmax_layers`). Build caches with `T2RCache(model.config)`."
        )
    if getattr(module, "t2r_softmax", False):
        return _softmax_layer_forward(module, query, key, value, layer, t2r_padding_mask, kwargs)
    feature_map = getattr(module, "feature_map", None)
    if feature_map is None:
        raise RuntimeError(
            f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}) has no `feature_map`: the "
            "'t2r' attention implementation only works inside a T2R model."
        )
    batch, num_q_heads, length, head_dim = query.shape
    num_kv = key.shape[1]
    q_feat = feature_map(query.view(batch, num_kv, num_q_heads // num_kv, length, head_dim))  # (B, Hkv, G, T, F)
    q_feat = q_feat.reshape(batch, num_q_heads, length, -1)  # (B, Hq, T, F)
    if getattr(module, "t2r_window", 0):
        out = _window_forward(module, query, key, value, q_feat, layer, t2r_padding_mask, kwargs)
        return out.transpose(1, 2).contiguous(), None
    k_feat = feature_map(key)  # (B, Hkv, T, F)
    if t2r_padding_mask is not None:
        keep = t2r_padding_mask[:, None, :, None].to(k_feat.dtype)
        k_feat, value = k_feat * keep, value * keep.to(value.dtype)

    state = layer.state if layer is not None else None
    decoding = length == 1 and state is not None
    if select_kernel(getattr(module, "t2r_kernel", "auto"), query) == "fla":
        num, den, new_state = fla_numerator_denominator(q_feat, k_feat, value, state=state, recurrent=decoding)
    elif decoding:
        num, den, new_state = recurrent_numerator_denominator(q_feat, k_feat, value, state=state)
    else:
        num, den, new_state = chunked_numerator_denominator(
            q_feat, k_feat, value, chunk_size=module.t2r_chunk_size, state=state
        )
    out = normalise(num, den, module.t2r_eps, value.dtype)
    if layer is not None:
        layer.update_state(new_state, length)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTN_IMPLEMENTATION, t2r_attention_forward)
