"""T2R models: a pretrained softmax-attention causal LM whose attentions run as linear attention (an RNN).

`T2RForCausalLM` and `T2RModel` wrap an instance of the source family's own model class (built from
`config.source_config`) and adopt its submodules under their original names: a T2R checkpoint has exactly the
source's keys plus one `feature_map` per attention. The source forward runs as is, with its attention function
switched to T2R linear attention (see `attention.py`), and the recurrent state lives in a `T2RCache`.

This file and its siblings are also the remote code written next to every saved checkpoint, so they import
only `torch` and `transformers` absolutely, and each other as `from .x import y`.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.utils import logging

from .attention import attach_feature_maps, check_supported
from .cache import T2RCache
from .configuration_t2r import T2RConfig

logger = logging.get_logger(__name__)

FEATURE_MAP_KEY = "feature_map"
WINDOW_FACTOR_KEY = "window_factor"
T2R_PARAMETER_KEYS = (FEATURE_MAP_KEY, WINDOW_FACTOR_KEY)  # submodule names of every parameter T2R adds


def is_t2r_parameter(name: str) -> bool:
    """Whether the parameter (or state-dict key) `name` is one T2R added rather than a source parameter."""
    return any(key in name.split(".") for key in T2R_PARAMETER_KEYS)


class T2RPreTrainedModel(PreTrainedModel):
    """Base class of T2R models: wraps a source-family model and adopts its submodules under their own names."""

    config_class = T2RConfig
    base_model_prefix = ""
    supports_gradient_checkpointing = True
    _supports_attention_backend = True
    _is_stateful = True
    _source_auto_class = AutoModel

    def __init__(self, config: T2RConfig, source_model: PreTrainedModel | None = None):
        super().__init__(config)
        source_config = source_model.config if source_model is not None else config.get_source_config()
        check_supported(source_config)
        if source_model is None:
            source_model = self._source_auto_class.from_config(source_config)
        else:  # adopted pretrained weights are initialised already: never let post_init touch them
            for module in source_model.modules():
                module._is_hf_initialized = True
        self._feature_map_owners = attach_feature_maps(source_model, source_config, config)
        # The source model is not registered as a submodule (its parameters would gain a prefix); its children are.
        self.__dict__["_source"] = source_model
        for name, child in source_model.named_children():
            self.add_module(name, child)
        for attr in ("_tied_weights_keys", "_no_split_modules", "_keys_to_ignore_on_load_unexpected"):
            setattr(self, attr, getattr(source_model, attr, None))
        self.base_model_prefix = getattr(source_model, "base_model_prefix", "")
        self.post_init()

    @property
    def source_model(self) -> PreTrainedModel:
        """The source-family model whose forward runs (it shares every submodule with this model)."""
        return self._source

    def _init_weights(self, module: nn.Module) -> None:
        if hasattr(module, "reset_parameters") and type(module).__module__.endswith("feature_maps"):
            module.reset_parameters()
        else:
            type(self._source)._init_weights(self._source, module)

    def train(self, mode: bool = True):
        super().train(mode)
        self._source.training = mode
        return self

    def get_input_embeddings(self) -> nn.Module:
        return self._source.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self._source.set_input_embeddings(value)

    def feature_map_parameters(self) -> list[nn.Parameter]:
        """The feature maps' parameters (one map per converted attention)."""
        return [p for n, p in self.named_parameters() if FEATURE_MAP_KEY in n.split(".")]

    def t2r_parameters(self) -> list[nn.Parameter]:
        """Every parameter T2R added: the feature maps and, with a sliding window, the window factors. Everything
        else is the source model's."""
        return [p for n, p in self.named_parameters() if is_t2r_parameter(n)]

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """Load a saved T2R model; a checkpoint that lacks feature-map weights is an error, never a random init."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        missing = sorted(k for k in info.get("missing_keys", ()) if is_t2r_parameter(k))
        if missing:
            raise ValueError(
                f"The checkpoint has no weights for {len(missing)} T2R parameters (feature maps or window factors; "
                f"e.g. {missing[0]}). "
                "It is not a trained T2R checkpoint: convert a softmax model with "
                "`T2RForCausalLM.from_softmax_pretrained(...)` instead of loading it."
            )
        return (model, info) if want_info else model

    def set_kernel(self, kernel: str) -> None:
        """Choose the linear-attention implementation: `"auto"` (the verified path, currently PyTorch), `"torch"`
        or `"fla"` (flash-linear-attention's kernels; raises at the next forward where they cannot run)."""
        from .configuration_t2r import check_kernel

        check_kernel(kernel)
        if kernel == "fla" and self.config.window_size:
            raise ValueError(
                "kernel='fla' runs pure T2R layers only; this model has a sliding window (window_size="
                f"{self.config.window_size}), which runs on the PyTorch path. Use 'auto' or 'torch'."
            )
        self.config.kernel = kernel
        for module in self.modules():
            if hasattr(module, "t2r_kernel"):
                module.t2r_kernel = kernel

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save weights, config (with `auto_map` for AutoConfig/AutoModel/AutoModelForCausalLM), the remote code
        and a model card (`README.md`), so the folder loads with or without `t2r_hf` installed."""
        self.config.auto_map = {
            "AutoConfig": "configuration_t2r.T2RConfig",
            "AutoModel": "modeling_t2r.T2RModel",
            "AutoModelForCausalLM": "modeling_t2r.T2RForCausalLM",
        }
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            from .model_card import write_model_card

            try:
                write_model_card(self.config, save_directory)
            except (ModuleNotFoundError, FileNotFoundError):  # remote code: the template ships with t2r_hf only
                logger.warning("Model card not written: its template ships with the `t2r-hf` package.")

    def _t2r_inputs(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        past_key_values: T2RCache | None,
        use_cache: bool | None,
    ) -> tuple[T2RCache | None, torch.Tensor | None, torch.Tensor | None]:
        """Resolve the cache, the padding mask of the new tokens and their positions."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        batch, length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if past_key_values is not None and not isinstance(past_key_values, T2RCache):
            raise TypeError(
                f"T2R models keep a recurrent state and need a T2RCache, got {type(past_key_values).__name__}. "
                "Pass `past_key_values=None` (one is created) or the cache a previous call returned."
            )
        cache = past_key_values if past_key_values is not None else (T2RCache(self.config) if use_cache else None)
        past = cache.get_seq_length() if cache is not None else 0
        mask = None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] < length:
                raise ValueError(
                    "T2R models take a 2-D padding mask of shape (batch, past + new tokens); got "
                    f"{tuple(attention_mask.shape)} for {length} new tokens and batch {batch}."
                )
            if position_ids is None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
            mask = attention_mask[:, -length:]
            # Drop an all-ones mask (the unpadded fast path). Under torch.compile it is kept instead: it gives the
            # same result and the step needs no host-device synchronisation.
            if not torch.compiler.is_compiling() and bool(mask.all()):
                mask = None
        if position_ids is None:
            device = (input_ids if input_ids is not None else inputs_embeds).device
            position_ids = torch.arange(past, past + length, device=device).unsqueeze(0).expand(batch, -1)
        return cache, mask, position_ids


class T2RModel(T2RPreTrainedModel):
    """The bare T2R backbone (the source family's base model with T2R attention), returning hidden states.

    Example:
    ```python
    >>> from transformers import LlamaConfig
    >>> from t2r_hf import T2RConfig, T2RModel
    >>> src = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                   num_attention_heads=4)
    >>> model = T2RModel(T2RConfig(source_config=src.to_dict(), feature_dim=8))
    >>> model(torch.tensor([[1, 2, 3]])).last_hidden_state.shape
    torch.Size([1, 3, 32])
    ```
    """

    _source_auto_class = AutoModel

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: T2RCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ):
        """Run the backbone; returns the source family's base-model output with `past_key_values` a T2RCache."""
        cache, mask, position_ids = self._t2r_inputs(
            input_ids, inputs_embeds, attention_mask, position_ids, past_key_values, use_cache
        )
        outputs = self._source(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            use_cache=False,
            t2r_cache=cache,
            t2r_padding_mask=mask,
            **kwargs,
        )
        if cache is not None:
            cache.check_finite()
        outputs.past_key_values = cache
        return outputs


class T2RForCausalLM(T2RPreTrainedModel, GenerationMixin):
    """A causal LM whose attentions are T2R linear attention: trains in parallel, generates as an RNN.

    Build one from any supported softmax model with [`T2RForCausalLM.from_softmax_pretrained`]; load a saved one
    with `AutoModelForCausalLM.from_pretrained`.

    Example:
    ```python
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from t2r_hf import T2RForCausalLM
    >>> src = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
    ...                                    num_hidden_layers=2, num_attention_heads=4))
    >>> model = T2RForCausalLM.from_softmax_pretrained(src, feature_dim=8)
    >>> model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False).shape
    torch.Size([1, 7])
    ```
    """

    _source_auto_class = AutoModelForCausalLM

    @classmethod
    def from_softmax_pretrained(cls, source, feature_dim: int = 32, **options) -> "T2RForCausalLM":
        """Convert a pretrained softmax-attention causal LM into a T2R model.

        Args:
            source: a hub id or local folder, or an already-loaded `PreTrainedModel`.
            feature_dim: `k`, the feature-map size (see [`T2RConfig`]).
            **options: T2R options (`feature_map`, `eps`, `chunk_size`, `kernel`, `window_size`,
                `softmax_layers`; see [`T2RConfig`]); every other keyword (`dtype`, `revision`, `gguf_file`,
                `device_map`, ...) goes to the source loader.

        The source weights are kept as they are (same names, same values); the only new parameters are the
        feature maps (and, with `window_size > 0`, one window factor per converted layer), initialised as
        documented in `feature_maps.py`. Layers listed in `softmax_layers` are left exactly as they were.
        """
        from .conversion import convert_softmax_model

        return convert_softmax_model(cls, source, feature_dim=feature_dim, **options)

    def get_output_embeddings(self) -> nn.Module:
        return self._source.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self._source.set_output_embeddings(value)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: T2RCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ):
        """Run the model; returns the source family's causal-LM output with `past_key_values` a T2RCache.

        `attention_mask` is the 2-D padding mask over past and new tokens; when `position_ids` are not given they
        are derived from it, so a left-padded row computes exactly what it computes unpadded.
        """
        cache, mask, position_ids = self._t2r_inputs(
            input_ids, inputs_embeds, attention_mask, position_ids, past_key_values, use_cache
        )
        outputs = self._source(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            labels=labels,
            use_cache=False,
            logits_to_keep=logits_to_keep,
            t2r_cache=cache,
            t2r_padding_mask=mask,
            **kwargs,
        )
        if cache is not None:
            cache.check_finite()
        outputs.past_key_values = cache
        return outputs

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs) -> None:
        """Give `generate` a fresh T2RCache (or check the one passed in); refuse KV-cache implementations."""
        cache = model_kwargs.get("past_key_values")
        if generation_config.cache_implementation is not None:
            raise ValueError(
                f"`cache_implementation={generation_config.cache_implementation!r}` selects a key/value cache; T2R "
                "models decode with a fixed-size recurrent state (T2RCache). Leave `cache_implementation` unset."
            )
        if cache is not None:
            if not isinstance(cache, T2RCache):
                raise TypeError(f"T2R models need a T2RCache, got {type(cache).__name__}.")
            cache._is_user_defined = True
            return
        if generation_config.use_cache is not False:
            model_kwargs["past_key_values"] = T2RCache(self.config)

    def _valid_auto_compile_criteria(self, model_kwargs, generation_config) -> bool:
        """Compile the decoding steps of `generate` when, and only when, the caller passes a `compile_config`.

        Unlike a static key/value cache, a T2R cache does not make `generate` compile on its own: the first
        compiled step costs 15-110 s on 2 CPU cores for SmolLM2-135M (35-115 s on an H100), more than short
        generations save. When asked, it compiles on any device (it pays on CPUs too; see bench/README.md). The
        prompt runs eagerly (unless `prefill_chunk_size` makes transformers run its chunks through the compiled
        call). Refused with a `ValueError`: CUDA-graph modes (the cache rebinds its state tensors at every step,
        which CUDA graphs cannot replay) and `fullgraph=True` (the finite-state check runs after the layers,
        outside the graph). Skipped with a warning: generation without a cache, CPU or disk offload, and
        quantization methods that cannot compile.
        """
        config = generation_config.compile_config
        if generation_config.disable_compile or config is None:
            return False
        options = config.options or {}
        if config.mode in ("reduce-overhead", "max-autotune") or options.get("triton.cudagraphs"):
            raise ValueError(
                f"compile_config mode {config.mode!r} captures CUDA graphs, which cannot replay a T2R cache (its state "
                "tensors are replaced at every step). Pass `CompileConfig(mode='default')` (or "
                "'max-autotune-no-cudagraphs')."
            )
        if config.fullgraph:
            raise ValueError(
                "compile_config has fullgraph=True, but a T2R decoding step checks its state for NaN/inf after the "
                "layers, outside the compiled graph (one graph break). Pass `CompileConfig(mode='default', "
                "fullgraph=False)`."
            )
        reason = None
        if model_kwargs.get("past_key_values") is None:
            reason = "generation runs without a cache (use_cache=False), so every step would have a new shape"
        elif getattr(self, "hf_quantizer", None) is not None and not self.hf_quantizer.is_compileable:
            reason = "this model's quantization method does not support compiling"
        elif hasattr(self, "hf_device_map"):
            devices = set(self.hf_device_map.values())
            if "disk" in devices or ("cpu" in devices and len(devices) > 1):
                reason = "the model is offloaded to CPU or disk, which torch.compile does not support"
        if reason is not None:
            logger.warning_once(f"compile_config ignored, decoding runs eagerly: {reason}.")
            return False
        os.environ["TOKENIZERS_PARALLELISM"] = "0"  # as transformers does before compiled decoding
        return True

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, **kwargs):
        """As in `GenerationMixin`, after refusing right padding, which a recurrent prefill cannot honour."""
        fresh = past_key_values is None or past_key_values.get_seq_length() == 0
        if fresh and attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask[:, -1].all()):
            raise ValueError(
                "Right padding detected: generation continues from the state after the last prompt position, which "
                "is padding for some rows. Pad on the left (`tokenizer.padding_side = 'left'`)."
            )
        return super().prepare_inputs_for_generation(
            input_ids, past_key_values=past_key_values, attention_mask=attention_mask, **kwargs
        )


T2RConfig.register_for_auto_class()
T2RModel.register_for_auto_class("AutoModel")
T2RForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["T2RPreTrainedModel", "T2RModel", "T2RForCausalLM"]
