"""`from_softmax_pretrained`: turn a pretrained softmax-attention causal LM into a T2R model in place."""

from __future__ import annotations

import copy
import os

from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.utils import logging

from .attention import check_supported
from .configuration_t2r import T2RConfig
from .modeling_t2r import is_t2r_parameter

logger = logging.get_logger(__name__)

T2R_OPTIONS = ("feature_map", "eps", "chunk_size", "kernel", "window_size", "softmax_layers")


def _load_source(source, loader_kwargs: dict) -> PreTrainedModel:
    if isinstance(source, PreTrainedModel):
        if loader_kwargs:
            raise TypeError(
                f"Loader options {sorted(loader_kwargs)} were given with an already-loaded model; pass them only "
                "with a hub id or a folder."
            )
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"`source` must be a hub id, a folder or a PreTrainedModel, got {type(source).__name__}.")
    config_kwargs = {k: loader_kwargs[k] for k in ("gguf_file", "revision", "trust_remote_code", "token") if k in loader_kwargs}
    check_supported(AutoConfig.from_pretrained(source, **config_kwargs))  # fail before loading any weights
    logger.info("Loading the softmax source model from %s", source)
    return AutoModelForCausalLM.from_pretrained(source, **loader_kwargs)


def _drop_quantizer_marks(model: PreTrainedModel) -> None:
    """A GGUF checkpoint is dequantized on load but keeps marks that make `save_pretrained` refuse; drop them."""
    quantizer = getattr(model, "hf_quantizer", None)
    quant_config = getattr(model.config, "quantization_config", None)
    if quantizer is None and quant_config is None:
        return
    method = str(getattr(quant_config, "quant_method", quant_config if isinstance(quant_config, dict) else ""))
    if "gguf" not in method.lower() and quantizer is not None and getattr(quantizer, "quantization_config", None):
        raise ValueError(
            f"The source model is quantized ({method or type(quantizer).__name__}); T2R conversion needs "
            "floating-point weights. Load it without quantization (or dequantize it) first."
        )
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.is_quantized = False


def convert_softmax_model(cls, source, feature_dim: int = 32, **options):
    """Implementation of `T2RForCausalLM.from_softmax_pretrained` (see there)."""
    t2r_options = {k: options.pop(k) for k in T2R_OPTIONS if k in options}
    model = _load_source(source, options)
    check_supported(model.config)
    if model.get_output_embeddings() is None:
        raise ValueError(
            f"{type(model).__name__} has no language-modeling head; pass the causal-LM model "
            "(e.g. `AutoModelForCausalLM.from_pretrained(...)`), not the bare backbone."
        )
    _drop_quantizer_marks(model)
    name = source if isinstance(source, (str, os.PathLike)) else getattr(model, "name_or_path", None)
    config = T2RConfig(
        source_config=model.config.to_dict(),
        feature_dim=feature_dim,
        base_model_name_or_path=str(name) if name else None,
        **t2r_options,
    )
    source_state = {k: v for k, v in model.state_dict().items()}
    param = next(model.parameters())
    t2r = cls(config, source_model=model)
    for owner in t2r._feature_map_owners:
        owner.feature_map.to(device=param.device, dtype=param.dtype)
        if hasattr(owner, "window_factor"):
            owner.window_factor.to(device=param.device, dtype=param.dtype)

    # Conversion is a state-dict copy: the source keys and tensors are untouched; the feature maps are the only new keys.
    state = t2r.state_dict()
    missing = set(source_state) - set(state)
    added = set(state) - set(source_state)
    if missing or any(not is_t2r_parameter(k) for k in added):
        raise RuntimeError(
            f"Conversion changed the source parameters: missing {sorted(missing)[:5]}, unexpected "
            f"{sorted(k for k in added if not is_t2r_parameter(k))[:5]}."
        )
    changed = [k for k, v in source_state.items() if state[k].data_ptr() != v.data_ptr()]
    if changed:
        raise RuntimeError(f"Conversion replaced source tensors instead of keeping them: {changed[:5]}.")
    t2r.generation_config = copy.deepcopy(model.generation_config)
    t2r.name_or_path = config.base_model_name_or_path or ""
    logger.info(
        "Converted %s to T2R: %d of %d layers (softmax kept in %s), feature map %r, window %d, %d new parameters.",
        config.source_model_type,
        config.num_hidden_layers - len(config.softmax_layers),
        config.num_hidden_layers,
        config.softmax_layers or "none",
        config.feature_map,
        config.window_size,
        sum(p.numel() for p in t2r.t2r_parameters()),
    )
    return t2r
