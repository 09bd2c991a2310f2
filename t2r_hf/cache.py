"""The recurrent cache of a T2R model: a fixed-size state `(S, z)` per layer instead of a growing KV cache.

`T2RCache` is a `transformers.Cache` whose layers are `T2RStateLayer` objects (plus, with a sliding window, a
fixed `W`-position key/value ring) and, for the layers kept as softmax (`softmax_layers`), `T2RSoftmaxLayer`
objects holding an ordinary growing key/value cache. `generate` drives it with its usual calls (`get_seq_length`, `reorder_cache` for beam search, `batch_repeat_interleave`, `batch_select_indices`).
Operations a recurrent state cannot honour (`crop`, used by assisted decoding) raise a clear error.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class _TensorLayer(CacheLayerMixin):
    """What both layer kinds share: batch-wise operations (`generate`'s beam search and batch expansion) applied
    to every tensor named in `_TENSORS`, byte counting and reset. Neither kind can be cropped."""

    is_compileable = False
    is_croppable = False
    is_sliding = False
    _TENSORS: tuple[str, ...] = ()

    def __init__(self, **kwargs):
        super().__init__()
        for name in self._TENSORS:
            setattr(self, name, None)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to pre-allocate: the T2R attention creates the tensors on the first token."""
        self.is_initialized = True

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        """Bytes held by this layer's tensors."""
        tensors = [getattr(self, name) for name in self._TENSORS]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def _map(self, fn) -> None:
        for name in self._TENSORS:
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, fn(tensor))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError(
            "A T2R cache cannot be cropped: its recurrent states keep no per-token history to roll back. Assisted "
            "or speculative decoding and cache cropping are not available for T2R models."
        )

    def reset(self) -> None:
        for name in self._TENSORS:
            setattr(self, name, None)

    def offload(self) -> None:
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        pass


class T2RStateLayer(_TensorLayer):
    """One layer's recurrent state: `S` `(B, Hkv, F, D)` and `z` `(B, Hkv, F)`, both fp32, plus a token count.

    With a sliding window it also holds the ring of the last `W` positions: keys and values `(B, Hkv, W, D)` in
    the model's dtype and their validity `(B, W)` (False for padding and not-yet-filled slots). Its size is fixed
    from the first token on.
    """

    _TENSORS = ("state_s", "state_z", "ring_keys", "ring_values", "ring_valid")

    def __init__(self, **kwargs):
        super().__init__()
        self.seen_tokens = 0
        self.state_finite: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        raise RuntimeError(
            "A T2R state layer stores no keys or values; the T2R attention updates it with `update_state`. "
            "Was a T2RCache passed to a softmax-attention model?"
        )

    @property
    def state(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`(S, z)`, or None before the first token."""
        return None if self.state_s is None else (self.state_s, self.state_z)

    def update_state(self, state: tuple[torch.Tensor, torch.Tensor], num_new_tokens: int) -> None:
        """Store the state after `num_new_tokens` more tokens, with a flag on its device saying whether it is finite.

        The flag is not read here: `T2RCache.check_finite` reads every layer's flag once per forward, so a step
        synchronises host and device once instead of once per layer, and `torch.compile` sees no branch inside
        the layers."""
        s, z = state
        self.state_s, self.state_z = s, z
        self.state_finite = torch.isfinite(z).all() & torch.isfinite(s).all()
        self.seen_tokens += num_new_tokens
        self.is_initialized = True

    @property
    def ring(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """`(keys, values, valid)` of the last `W` positions (sliding-window layers), or None."""
        return None if self.ring_keys is None else (self.ring_keys, self.ring_values, self.ring_valid)

    def update_ring(self, ring: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        """Store the window ring after the latest tokens (call after `update_state`)."""
        self.ring_keys, self.ring_values, self.ring_valid = ring

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def reset(self) -> None:
        super().reset()
        self.seen_tokens = 0
        self.state_finite = None


class T2RSoftmaxLayer(_TensorLayer):
    """The cache of a layer kept as softmax attention: keys and values `(B, Hkv, L, D)` and their validity
    `(B, L)` (False for padding), growing by one position per token like any key/value cache."""

    _TENSORS = ("keys", "values", "valid")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        raise RuntimeError("T2R softmax layers are updated by the T2R attention with `append`.")

    def append(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Append the new positions; return the whole history `(keys, values, valid)`."""
        if self.keys is None:
            self.keys, self.values, self.valid = keys, values, valid
        else:
            self.keys = torch.cat([self.keys, keys], dim=2)
            self.values = torch.cat([self.values, values], dim=2)
            self.valid = torch.cat([self.valid, valid], dim=1)
        self.is_initialized = True
        return self.keys, self.values, self.valid

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]


class T2RCache(Cache):
    """Recurrent state cache for T2R models: constant size, whatever the number of tokens seen.

    Created automatically by `generate` and by a forward with `use_cache=True`; pass the one returned in
    `outputs.past_key_values` back to continue from where a previous call stopped.

    Args:
        config: the T2R model's configuration: `num_hidden_layers` sets the number of layers and
            `softmax_layers` which of them keep a key/value cache (`T2RSoftmaxLayer`).
        num_layers: the number of layers, instead of `config` (all of them recurrent).

    Example:
    ```python
    >>> out = model(input_ids, use_cache=True)          # doctest: +SKIP
    >>> out.past_key_values.get_seq_length(), out.past_key_values.nbytes()  # doctest: +SKIP
    ```
    """

    def __init__(self, config=None, num_layers: int | None = None):
        softmax_layers: set[int] = set()
        if num_layers is None:
            if config is None:
                raise ValueError("T2RCache needs `config` or `num_layers`.")
            num_layers = config.num_hidden_layers
            softmax_layers = set(getattr(config, "softmax_layers", None) or ())
        layers = [T2RSoftmaxLayer() if i in softmax_layers else T2RStateLayer() for i in range(num_layers)]
        super().__init__(layers=layers)

    def nbytes(self) -> int:
        """Total bytes held by every layer (the states, the window rings and the softmax layers' caches)."""
        return sum(layer.nbytes() for layer in self.layers)

    @torch.compiler.disable
    def check_finite(self) -> None:
        """Raise `FloatingPointError` if the latest forward left a layer's state non-finite (NaN or inf).

        T2R models call this once at the end of every forward that uses a cache: one host-device synchronisation
        for all layers (under `torch.compile`, one graph break after the layers). A cache that failed the check
        holds the non-finite state; start a new one.
        """
        flags = [(index, layer.state_finite) for index, layer in enumerate(self.layers)
                 if getattr(layer, "state_finite", None) is not None]
        if not flags:
            return
        device = flags[0][1].device
        if bool(torch.stack([flag.to(device) for _, flag in flags]).all()):
            return
        bad = [index for index, flag in flags if not bool(flag)]
        raise FloatingPointError(
            f"The T2R state of layer(s) {', '.join(map(str, bad))} became non-finite (NaN or inf). The inputs or "
            "activations overflowed; run the model in fp32 or bf16 rather than fp16, check the inputs for NaN, and "
            "start from a new cache."
        )

    @property
    def is_croppable(self) -> bool:
        return False

    def crop(self, tokens_to_remove: int) -> None:
        self.layers[0].crop(tokens_to_remove)


__all__ = ["T2RCache", "T2RSoftmaxLayer", "T2RStateLayer"]
