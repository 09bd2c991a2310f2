"""Configuration of a T2R model: the source model's whole configuration plus the T2R options."""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PreTrainedConfig

KERNELS = ("auto", "torch", "fla")  # see `t2r_hf.kernels`
FEATURE_MAPS = ("t2r", "elu", "hedgehog")


def check_kernel(kernel: str) -> None:
    """Raise `ValueError` unless `kernel` is one of `KERNELS`."""
    if kernel not in KERNELS:
        raise ValueError(f"`kernel` must be one of {KERNELS}, got {kernel!r}.")

# Fields copied from the source configuration onto the T2R configuration, so that generic HF code
# (generation, tying, resizing, Trainer) reads the same values it would read on the source model.
_MIRRORED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


class T2RConfig(PreTrainedConfig):
    r"""Configuration for [`T2RForCausalLM`] and [`T2RModel`].

    A T2R model is a pretrained softmax-attention causal LM whose attentions compute linear attention through a
    learned feature map (Kasai et al., 2021, *Finetuning Pretrained Transformers into RNNs*). The configuration
    therefore carries the source model's entire configuration (`source_config`, a plain dict with its
    `model_type`) and the T2R options below. Fields such as `vocab_size` or `tie_word_embeddings` are mirrored
    from the source so generic Hugging Face code reads the values it expects.

    Args:
        source_config (`dict`):
            `to_dict()` of the source model's configuration (must include `model_type`).
        feature_dim (`int`, defaults to 32):
            Size `k` of the learned projection `W` (`k x head_dim`, one per key/value head). For `"hedgehog"` the
            feature vector has `2 * k` entries; for `"elu"` (parameter-free) it equals the head dimension.
        feature_map (`str`, defaults to `"t2r"`):
            `"t2r"`: `ReLU(W x + b)` (Kasai et al., 2021); `"elu"`: `elu(x) + 1` (Katharopoulos et al., 2020);
            `"hedgehog"`: `[softmax(W x), softmax(-W x)]` (Zhang et al., 2024).
        eps (`float`, defaults to 1e-2):
            Each attention row is divided by `max(row_sum, eps)`, computed in fp32 (the T2R authors' value).
        chunk_size (`int`, defaults to 64):
            Chunk length of the chunked parallel form used for training and prefill.
        kernel (`str`, defaults to `"auto"`):
            Which implementation computes linear attention: `"auto"` picks the verified path, currently PyTorch
            everywhere (see `t2r_hf.kernels` for the GPU measurements behind that); `"torch"` always uses the
            PyTorch forms; `"fla"` uses flash-linear-attention's Triton kernels (the `gpu` extra) and raises
            where they cannot run. Not a property of the weights: change it any time with `model.set_kernel(...)`.
        window_size (`int`, defaults to 0):
            `0`: pure T2R. `W > 0`: every converted layer is a sliding-window hybrid (LoLCATs): softmax weights over
            the last `W` keys and linear attention beyond them, under one normaliser, the softmax part weighted by
            a learned per-head factor `sigmoid(w)` (initially 0.1). Decoding keeps a `W`-position key/value ring
            beside each state, so memory stays constant. The exact form is in `t2r_hf/ops.py`.
        softmax_layers (`list[int]`, defaults to `[]`):
            Indices of layers that keep their original softmax attention (and an ordinary, growing key/value
            cache in generation). At least one layer must be converted.
        base_model_name_or_path (`str`, *optional*):
            Where the source weights came from; recorded in the model card.

    Example:
    ```python
    >>> from transformers import LlamaConfig
    >>> from t2r_hf import T2RConfig
    >>> src = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    >>> cfg = T2RConfig(source_config=src.to_dict(), feature_dim=16)
    >>> cfg.num_hidden_layers, cfg.source_model_type
    (2, 'llama')
    ```
    """

    model_type = "t2r"
    keys_to_ignore_at_inference = ["past_key_values"]

    source_config: dict | None = None
    feature_dim: int = 32
    feature_map: str = "t2r"
    eps: float = 1e-2
    chunk_size: int = 64
    kernel: str = "auto"
    window_size: int = 0
    softmax_layers: list[int] | None = None
    base_model_name_or_path: str | None = None
    use_cache: bool = True

    def __post_init__(self, **kwargs: Any) -> None:
        if isinstance(self.source_config, PreTrainedConfig):
            self.source_config = self.source_config.to_dict()
        if self.source_config is not None:
            if not isinstance(self.source_config, dict) or "model_type" not in self.source_config:
                raise ValueError(
                    "`source_config` must be the `to_dict()` of the source model's configuration, including its "
                    f"`model_type`; got {type(self.source_config).__name__}."
                )
            source = self.get_source_config()  # resolves family aliases such as GPT-2's `n_layer`
            for key in _MIRRORED_FIELDS:
                if hasattr(source, key):
                    kwargs.pop(key, None)
                    setattr(self, key, getattr(source, key))
        self._validate_t2r_options()
        super().__post_init__(**kwargs)

    def _validate_t2r_options(self) -> None:
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"`feature_map` must be one of {FEATURE_MAPS}, got {self.feature_map!r}.")
        if not isinstance(self.feature_dim, int) or isinstance(self.feature_dim, bool) or self.feature_dim < 1:
            raise ValueError(f"`feature_dim` must be a positive integer, got {self.feature_dim!r}.")
        if not isinstance(self.eps, (int, float)) or not self.eps > 0:
            raise ValueError(f"`eps` must be a positive number, got {self.eps!r}.")
        if not isinstance(self.chunk_size, int) or isinstance(self.chunk_size, bool) or self.chunk_size < 1:
            raise ValueError(f"`chunk_size` must be a positive integer, got {self.chunk_size!r}.")
        check_kernel(self.kernel)
        if not isinstance(self.window_size, int) or isinstance(self.window_size, bool) or self.window_size < 0:
            raise ValueError(
                f"`window_size` must be an integer >= 0 (0 for pure T2R), got {self.window_size!r}."
            )
        if self.window_size and self.kernel == "fla":
            raise ValueError(
                "kernel='fla' runs pure T2R layers only; a sliding window (`window_size > 0`) runs on the PyTorch "
                "path. Use kernel='auto' or 'torch'."
            )
        layers = [] if self.softmax_layers is None else self.softmax_layers
        if not isinstance(layers, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in layers
        ):
            raise ValueError(f"`softmax_layers` must be a list of layer indices, got {self.softmax_layers!r}.")
        num_layers = getattr(self, "num_hidden_layers", None) if self.source_config is not None else None
        bad = [i for i in layers if i < 0 or (num_layers is not None and i >= num_layers)]
        if bad:
            span = f"0..{num_layers - 1}" if num_layers is not None else ">= 0"
            raise ValueError(
                f"`softmax_layers` {bad} out of range: layer indices must be in {span} "
                "(negative indices are not accepted)."
            )
        if len(set(layers)) != len(layers):
            raise ValueError(f"`softmax_layers` lists a layer twice: {list(layers)}.")
        if num_layers is not None and len(layers) >= num_layers:
            raise ValueError(
                f"`softmax_layers` keeps all {num_layers} layers as softmax: nothing would be converted."
            )
        self.softmax_layers = sorted(layers)

    @property
    def linear_layers(self) -> list[int]:
        """Indices of the converted (T2R) layers: every layer not in `softmax_layers`."""
        kept = set(self.softmax_layers or ())
        return [i for i in range(self.num_hidden_layers) if i not in kept]

    @property
    def source_model_type(self) -> str | None:
        """The `model_type` of the source architecture (`"llama"`, `"gpt2"`, ...)."""
        return None if self.source_config is None else self.source_config["model_type"]

    def get_source_config(self) -> PreTrainedConfig:
        """Rebuild the source model's configuration object from `source_config`."""
        if self.source_config is None:
            raise ValueError(
                "This T2RConfig has no `source_config`; build T2R models with "
                "`T2RForCausalLM.from_softmax_pretrained(...)` or pass `source_config=src_config.to_dict()`."
            )
        fields = dict(self.source_config)
        return AutoConfig.for_model(fields.pop("model_type"), **fields)


__all__ = ["T2RConfig"]
