"""The recurrent cache of a T2R model: a fixed-size state `(S, z)` per layer instead of a growing KV cache.

`T2RCache` is a `transformers.Cache` whose layers are `T2RStateLayer` objects, so `generate` drives it with its
usual calls (`get_seq_length`, `reorder_cache` for beam search, `batch_repeat_interleave`, `batch_select_indices`).
Operations a recurrent state cannot honour (`crop`, used by assisted decoding) raise a clear error.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class T2RStateLayer(CacheLayerMixin):
    """One layer's recurrent state: `S` `(B, Hkv, F, D)` and `z` `(B, Hkv, F)`, both fp32, plus a token count."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, **kwargs):
        super().__init__()
        self.state_s: torch.Tensor | None = None
        self.state_z: torch.Tensor | None = None
        self.seen_tokens = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to pre-allocate: the state is created by the first `update_state`."""
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        raise RuntimeError(
            "A T2R state layer stores no keys or values; the T2R attention updates it with `update_state`. "
            "Was a T2RCache passed to a softmax-attention model?"
        )

    @property
    def state(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`(S, z)`, or None before the first token."""
        return None if self.state_s is None else (self.state_s, self.state_z)

    def update_state(self, state: tuple[torch.Tensor, torch.Tensor], num_new_tokens: int, layer_idx: int) -> None:
        """Store the state after `num_new_tokens` more tokens; refuse a non-finite one."""
        s, z = state
        if not (torch.isfinite(z).all() and torch.isfinite(s).all()):
            raise FloatingPointError(
                f"The T2R state of layer {layer_idx} became non-finite (NaN or inf). The inputs or activations "
                "overflowed; run the model in fp32 or bf16 rather than fp16, and check the inputs for NaN."
            )
        self.state_s, self.state_z = s, z
        self.seen_tokens += num_new_tokens
        self.is_initialized = True

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        """Bytes held by the state tensors."""
        if self.state_s is None:
            return 0
        return self.state_s.numel() * self.state_s.element_size() + self.state_z.numel() * self.state_z.element_size()

    def _map(self, fn) -> None:
        if self.state_s is not None:
            self.state_s, self.state_z = fn(self.state_s), fn(self.state_z)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError(
            "A T2R recurrent state cannot be cropped: it keeps no per-token history to roll back. Assisted or "
            "speculative decoding and cache cropping are not available for T2R models."
        )

    def reset(self) -> None:
        self.state_s = self.state_z = None
        self.seen_tokens = 0

    def offload(self) -> None:
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        pass


class T2RCache(Cache):
    """Recurrent state cache for T2R models: constant size, whatever the number of tokens seen.

    Created automatically by `generate` and by a forward with `use_cache=True`; pass the one returned in
    `outputs.past_key_values` back to continue from where a previous call stopped.

    Args:
        config: the T2R model's configuration (its `num_hidden_layers` sets the number of layers).
        num_layers: the number of layers, instead of `config`.

    Example:
    ```python
    >>> out = model(input_ids, use_cache=True)          # doctest: +SKIP
    >>> out.past_key_values.get_seq_length(), out.past_key_values.nbytes()  # doctest: +SKIP
    ```
    """

    def __init__(self, config=None, num_layers: int | None = None):
        if num_layers is None:
            if config is None:
                raise ValueError("T2RCache needs `config` or `num_layers`.")
            num_layers = config.num_hidden_layers
        super().__init__(layers=[T2RStateLayer() for _ in range(num_layers)])

    def nbytes(self) -> int:
        """Total bytes held by every layer's state."""
        return sum(layer.nbytes() for layer in self.layers)

    @property
    def is_croppable(self) -> bool:
        return False

    def crop(self, tokens_to_remove: int) -> None:
        self.layers[0].crop(tokens_to_remove)


__all__ = ["T2RCache", "T2RStateLayer"]
