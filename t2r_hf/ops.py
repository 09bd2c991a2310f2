"""Causal linear attention with a normaliser, as plain tensor functions.

All three forms compute, for feature-mapped queries `q = phi(q)` and keys `k = phi(k)`,

    y_i = (q_i^T S_i) / max(q_i^T z_i, eps),   S_i = S_0 + sum_{j<=i} k_j v_j^T,   z_i = z_0 + sum_{j<=i} k_j

with the state `(S, z)` in fp32 whatever the input dtype. Shapes (grouped-query attention: `Hq = G * Hkv`):

    q: (B, Hq, T, F)    k: (B, Hkv, T, F)    v: (B, Hkv, T, D)
    S: (B, Hkv, F, D)   z: (B, Hkv, F)       y: (B, Hq, T, D) in v's dtype

Positions to ignore (padding) must arrive with `k` and `v` zeroed: they then add nothing to the state.

- `linear_attention_naive`: the quadratic reference (materialises a T x T matrix; for tests).
- `linear_attention_chunked`: intra-chunk quadratic, inter-chunk through the state; O(T C F + T F D) time and
  O(T) memory. Used for training and prefill.
- `linear_attention_recurrent`: one token at a time on the state; used for decoding.

Sliding-window hybrid (LoLCATs, Zhang et al. 2024), `window_size = W >= 1`: query `i` attends with softmax
weights to the last `W` keys (positions `i-W+1 .. i`) and through the feature map to every earlier key, under one
normaliser:

    y_i = (g * sum_{j in win(i)} e_ij v_j + sum_{j <= i-W} (q_i . k_j) v_j) / max(g * sum_{j in win(i)} e_ij + q_i . z_{i-W}, eps)
    e_ij = exp(s_ij - m_i),   s_ij = scaling * q_i^T k_j (raw queries/keys),   m_i = max_{j in win(i)} s_ij

with `g = sigmoid(w_h)` a learned factor per query head. The linear part is ordinary causal linear attention on
keys delayed by `W` positions (a key enters the state `(S, z)` when it leaves the window), so the state keeps the
T2R form and decoding keeps a fixed `W`-token key/value ring beside it. Because the window always holds the
query's own key, the denominator is at least `g`; with `W >= T` the linear part is empty and `y` is exactly
softmax attention.

- `window_attention_naive`: the quadratic reference of the hybrid (for tests).
- `window_softmax_numerator_denominator`: the banded softmax part, blockwise (O(T (C + W)) memory, never T x T).
- `softmax_attention`: exact causal softmax attention over a key history (the layers kept as softmax, and the
  attention-transfer teacher).
"""

from __future__ import annotations

import torch

State = tuple[torch.Tensor, torch.Tensor]


def _group_queries(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """(B, Hq, T, F) -> (B, Hkv, G, T, F)."""
    batch, num_q_heads, length, feat = q.shape
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads cannot be grouped over {num_kv_heads} key/value heads.")
    return q.view(batch, num_kv_heads, num_q_heads // num_kv_heads, length, feat)


def _initial_state(k: torch.Tensor, v: torch.Tensor, state: State | None) -> State:
    batch, heads, _, feat = k.shape
    if state is not None:
        return state[0].float(), state[1].float()
    s0 = k.new_zeros(batch, heads, feat, v.shape[-1], dtype=torch.float32)
    return s0, k.new_zeros(batch, heads, feat, dtype=torch.float32)


def normalise(num: torch.Tensor, den: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """`num / max(den, eps)` in fp32, cast to `dtype`. num: (B, Hkv, G, T, D), den: (B, Hkv, G, T) -> (B, Hq, T, D)."""
    y = num / den.clamp(min=eps).unsqueeze(-1)
    batch, kv_heads, group, length, dim = y.shape
    return y.reshape(batch, kv_heads * group, length, dim).to(dtype)


def linear_attention_naive(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float, state: State | None = None
) -> tuple[torch.Tensor, State]:
    """Reference causal linear attention (quadratic in T). Returns `(y, (S, z))` with the final state."""
    s0, z0 = _initial_state(k, v, state)
    qg = _group_queries(q, k.shape[1]).float()  # (B, Hkv, G, T, F)
    kf, vf = k.float(), v.float()
    length = k.shape[2]
    scores = torch.einsum("bhgtf,bhsf->bhgts", qg, kf)  # (B, Hkv, G, T, T)
    scores = scores * torch.ones(length, length, device=k.device).tril()
    num = torch.einsum("bhgts,bhsd->bhgtd", scores, vf) + torch.einsum("bhgtf,bhfd->bhgtd", qg, s0)
    den = scores.sum(-1) + torch.einsum("bhgtf,bhf->bhgt", qg, z0)
    s1 = s0 + torch.einsum("bhtf,bhtd->bhfd", kf, vf)
    z1 = z0 + kf.sum(2)
    return normalise(num, den, eps, v.dtype), (s1, z1)


def chunked_numerator_denominator(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int = 64, state: State | None = None
) -> tuple[torch.Tensor, torch.Tensor, State]:
    """Unnormalised chunked causal linear attention: `(num (B, Hkv, G, T, D), den (B, Hkv, G, T), (S, z))`."""
    s0, z0 = _initial_state(k, v, state)
    batch, kv_heads, length, feat = k.shape
    dim = v.shape[-1]
    chunk = max(1, min(chunk_size, length))
    pad = (-length) % chunk
    qg = _group_queries(q, kv_heads).float()
    kf, vf = k.float(), v.float()
    if pad:  # zero keys/values add nothing; zero queries are sliced away below
        qg = torch.nn.functional.pad(qg, (0, 0, 0, pad))
        kf = torch.nn.functional.pad(kf, (0, 0, 0, pad))
        vf = torch.nn.functional.pad(vf, (0, 0, 0, pad))
    n = (length + pad) // chunk
    group = qg.shape[2]
    qc = qg.view(batch, kv_heads, group, n, chunk, feat)  # (B, Hkv, G, N, C, F)
    kc = kf.view(batch, kv_heads, n, chunk, feat)  # (B, Hkv, N, C, F)
    vc = vf.view(batch, kv_heads, n, chunk, dim)  # (B, Hkv, N, C, D)

    kv_per_chunk = torch.einsum("bhncf,bhncd->bhnfd", kc, vc)  # (B, Hkv, N, F, D)
    k_per_chunk = kc.sum(3)  # (B, Hkv, N, F)
    s_incl = kv_per_chunk.cumsum(2) + s0.unsqueeze(2)  # state after each chunk
    z_incl = k_per_chunk.cumsum(2) + z0.unsqueeze(2)
    s_prev = s_incl - kv_per_chunk  # state before each chunk
    z_prev = z_incl - k_per_chunk

    causal = torch.ones(chunk, chunk, device=k.device).tril()
    scores = torch.einsum("bhgncf,bhnsf->bhgncs", qc, kc) * causal  # (B, Hkv, G, N, C, C)
    num = torch.einsum("bhgncs,bhnsd->bhgncd", scores, vc) + torch.einsum("bhgncf,bhnfd->bhgncd", qc, s_prev)
    den = scores.sum(-1) + torch.einsum("bhgncf,bhnf->bhgnc", qc, z_prev)
    num = num.reshape(batch, kv_heads, group, n * chunk, dim)[..., :length, :]
    den = den.reshape(batch, kv_heads, group, n * chunk)[..., :length]
    return num, den, (s_incl[:, :, -1], z_incl[:, :, -1])


def linear_attention_chunked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float, chunk_size: int = 64, state: State | None = None
) -> tuple[torch.Tensor, State]:
    """Chunked causal linear attention. Never builds a T x T matrix. Returns `(y, (S, z))`."""
    num, den, new_state = chunked_numerator_denominator(q, k, v, chunk_size=chunk_size, state=state)
    return normalise(num, den, eps, v.dtype), new_state


def recurrent_numerator_denominator(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: State | None = None
) -> tuple[torch.Tensor, torch.Tensor, State]:
    """Unnormalised token-by-token causal linear attention: `(num, den, (S, z))` as in the chunked form."""
    s, z = _initial_state(k, v, state)
    qg = _group_queries(q, k.shape[1]).float()
    kf, vf = k.float(), v.float()
    outputs = []
    for t in range(k.shape[2]):
        s = s + kf[:, :, t, :, None] * vf[:, :, t, None, :]  # (B, Hkv, F, D)
        z = z + kf[:, :, t]  # (B, Hkv, F)
        num = torch.einsum("bhgf,bhfd->bhgd", qg[:, :, :, t], s)
        den = torch.einsum("bhgf,bhf->bhg", qg[:, :, :, t], z)
        outputs.append((num, den))
    num = torch.stack([o[0] for o in outputs], dim=3)  # (B, Hkv, G, T, D)
    den = torch.stack([o[1] for o in outputs], dim=3)
    return num, den, (s, z)


def linear_attention_recurrent(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float, state: State | None = None
) -> tuple[torch.Tensor, State]:
    """Token-by-token causal linear attention on the state `(S, z)` (the RNN form). Returns `(y, (S, z))`."""
    num, den, new_state = recurrent_numerator_denominator(q, k, v, state=state)
    return normalise(num, den, eps, v.dtype), new_state


def window_attention_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_feat: torch.Tensor,
    k_feat: torch.Tensor,
    window: int,
    scaling: float,
    factor: torch.Tensor,
    eps: float,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference sliding-window hybrid attention (quadratic in T; see the module docstring for the form).

    q: (B, Hq, T, D); k, v: (B, Hkv, T, D); q_feat: (B, Hq, T, F); k_feat: (B, Hkv, T, F); factor: (Hq,) in (0, 1);
    valid: (B, T) bool, False for padding keys. Returns y: (B, Hq, T, D) in v's dtype.
    """
    batch, kv_heads, length, _ = k.shape
    qg = _group_queries(q, kv_heads).float()
    qfg = _group_queries(q_feat, kv_heads).float()
    keep = torch.ones(batch, length, dtype=torch.bool, device=k.device) if valid is None else valid.bool()
    vf = v.float() * keep[:, None, :, None]
    i = torch.arange(length, device=k.device)[:, None]
    j = torch.arange(length, device=k.device)[None, :]
    in_window = (j <= i) & (j > i - window) & keep[:, None, None, None, :]  # (B, 1, 1, T, T)
    in_linear = (j <= i - window) & keep[:, None, None, None, :]
    scores = torch.einsum("bhgtd,bhsd->bhgts", qg, k.float()) * scaling
    scores = scores.masked_fill(~in_window, torch.finfo(torch.float32).min)
    weights = torch.exp(scores - scores.amax(-1, keepdim=True)) * in_window
    linear = torch.einsum("bhgtf,bhsf->bhgts", qfg, k_feat.float()) * in_linear
    gate = factor.float().view(1, kv_heads, -1, 1, 1)
    num = torch.einsum("bhgts,bhsd->bhgtd", gate * weights + linear, vf)
    den = (gate * weights + linear).sum(-1)
    return normalise(num, den, eps, v.dtype)


def window_softmax_numerator_denominator(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    valid: torch.Tensor,
    window: int,
    scaling: float,
    block_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The softmax part of the hybrid: `(num (B, Hkv, G, T, D), den (B, Hkv, G, T))`, unweighted by the factor.

    q: (B, Hq, T, D) for the T new positions; keys, values: (B, Hkv, W + T, D), the `W` keys before the new
    positions (the ring; zeros where not yet filled) followed by the new ones; valid: (B, W + T) bool. Query `t`
    sees `keys[:, :, t + 1 : t + 1 + W]`. Values must be zero where `valid` is False. Computed in blocks of
    `C = min(W, block_size, T)` queries against `C + W - 1` keys, in fp32 (a decoding step: 1 query, W keys).
    """
    batch, num_q_heads, length, dim = q.shape
    kv_heads = keys.shape[1]
    if keys.shape[2] != window + length or valid.shape[-1] != window + length:
        raise ValueError(f"Expected {window} ring keys before the {length} new ones, got {keys.shape[2]} keys.")
    if length == 1:  # a decoding step: one query against the W keys after the oldest, no blocking needed
        qg = _group_queries(q, kv_heads).float()  # (B, Hkv, G, 1, D)
        ok = valid[:, None, None, None, 1:].bool()  # (B, 1, 1, 1, W)
        scores = torch.einsum("bhgtd,bhsd->bhgts", qg, keys[:, :, 1:].float()) * scaling
        scores = scores.masked_fill(~ok, torch.finfo(torch.float32).min)
        weights = torch.exp(scores - scores.amax(-1, keepdim=True)) * ok
        return torch.einsum("bhgts,bhsd->bhgtd", weights, values[:, :, 1:].float()), weights.sum(-1)
    chunk = max(1, min(window, block_size, length))
    n = -(-length // chunk)
    span = chunk + window - 1
    pad = n * chunk - length
    k1 = torch.nn.functional.pad(keys[:, :, 1:].float(), (0, 0, 0, pad))
    v1 = torch.nn.functional.pad(values[:, :, 1:].float(), (0, 0, 0, pad))
    ok1 = torch.nn.functional.pad(valid[:, 1:].bool(), (0, pad), value=False)
    kb = k1.unfold(2, span, chunk)  # (B, Hkv, N, D, span)
    vb = v1.unfold(2, span, chunk)
    okb = ok1.unfold(1, span, chunk)  # (B, N, span)
    qg = torch.nn.functional.pad(_group_queries(q, kv_heads).float(), (0, 0, 0, pad))
    qg = qg.view(batch, kv_heads, num_q_heads // kv_heads, n, chunk, dim)
    a = torch.arange(chunk, device=q.device)[:, None]
    b = torch.arange(span, device=q.device)[None, :]
    band = (b >= a) & (b < a + window)  # (C, span)
    mask = band & okb[:, None, None, :, None, :]  # (B, 1, 1, N, C, span)
    scores = torch.einsum("bhgncd,bhnds->bhgncs", qg, kb) * scaling
    scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
    weights = torch.exp(scores - scores.amax(-1, keepdim=True)) * mask
    num = torch.einsum("bhgncs,bhnds->bhgncd", weights, vb)
    den = weights.sum(-1)
    group = qg.shape[2]
    num = num.reshape(batch, kv_heads, group, n * chunk, dim)[..., :length, :]
    den = den.reshape(batch, kv_heads, group, n * chunk)[..., :length]
    return num, den


def softmax_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scaling: float,
    valid: torch.Tensor | None = None,
    sliding_window: int | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Exact causal softmax attention of T new queries over a history of P + T keys (P earlier ones first).

    q: (B, Hq, T, D); keys, values: (B, Hkv, P + T, D); valid: (B, P + T) bool, False for padding keys (None: all
    valid); sliding_window: attend only to the last `sliding_window` positions (as the source family does).
    A query whose keys are all masked (a padding position) attends to itself, so no row is empty or NaN.
    Returns (B, T, Hq, D) in q's dtype, the layout attention functions return.
    """
    group = q.shape[1] // keys.shape[1]
    if group > 1:
        keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    length, total = q.shape[2], keys.shape[2]
    if valid is None and not sliding_window and total == length:
        out = torch.nn.functional.scaled_dot_product_attention(
            q, keys, values, is_causal=True, scale=scaling, dropout_p=dropout
        )
        return out.transpose(1, 2)
    i = torch.arange(total - length, total, device=q.device)[:, None]
    j = torch.arange(total, device=q.device)[None, :]
    mask = j <= i
    if sliding_window:
        mask = mask & (j > i - sliding_window)
    mask = mask[None, None]  # (1, 1, T, P + T)
    if valid is not None:
        mask = mask & valid.bool()[:, None, None, :]
    mask = mask | (j == i)[None, None]
    out = torch.nn.functional.scaled_dot_product_attention(
        q, keys, values, attn_mask=mask, scale=scaling, dropout_p=dropout
    )
    return out.transpose(1, 2)


Ring = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def empty_ring(key: torch.Tensor, window: int) -> Ring:
    """An unfilled key/value ring of `window` positions for `key`'s batch and heads: zeros, all invalid."""
    batch, heads, _, dim = key.shape
    zeros = key.new_zeros(batch, heads, window, dim)
    return zeros, zeros.clone(), torch.zeros(batch, window, dtype=torch.bool, device=key.device)


def hybrid_numerator_denominator(
    q: torch.Tensor,
    q_feat: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_map,
    window: int,
    scaling: float,
    factor: torch.Tensor,
    valid: torch.Tensor | None = None,
    state: State | None = None,
    ring: Ring | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor, State, Ring]:
    """The sliding-window hybrid over T new positions, continuing from `(state, ring)`.

    q: (B, Hq, T, D) raw queries and q_feat their features (B, Hq, T, F); k, v: (B, Hkv, T, D) raw keys/values;
    feature_map: maps keys (B, Hkv, n, D) to features (B, Hkv, n, F); factor: (Hq,) the softmax weights `g`;
    valid: (B, T) bool, False for padding (None: all valid); state: `(S, z)` of the keys that left the window;
    ring: `(keys, values, valid)` of the last `W` positions, values zero where not valid, as this function
    returns it (None: empty). Returns `(num, den)` shaped as
    `chunked_numerator_denominator`'s, the new state and the new ring. One call over T positions and T calls
    over one position each compute the same thing.
    """
    batch, kv_heads, length, _ = k.shape
    ring_k, ring_v, ring_ok = ring if ring is not None else empty_ring(k, window)
    ok = torch.ones(batch, length, dtype=torch.bool, device=k.device) if valid is None else valid.bool()
    keys = torch.cat([ring_k, k], dim=2)
    all_ok = torch.cat([ring_ok, ok], dim=1)
    # The ring's values were zeroed where invalid when they entered it: only the new ones need masking.
    values = torch.cat([ring_v, v * ok[:, None, :, None].to(v.dtype)], dim=2)
    # Keys 0..T-1 of `keys` leave the window at the new positions 0..T-1 and enter the linear state.
    leaving = all_ok[:, None, :length, None]
    k_feat = feature_map(keys[:, :, :length]) * leaving.to(keys.dtype)
    if length == 1 and state is not None:
        num, den, new_state = recurrent_numerator_denominator(q_feat, k_feat, values[:, :, :length], state=state)
    else:
        num, den, new_state = chunked_numerator_denominator(
            q_feat, k_feat, values[:, :, :length], chunk_size=chunk_size, state=state
        )
    w_num, w_den = window_softmax_numerator_denominator(q, keys, values, all_ok, window, scaling, chunk_size)
    gate = factor.float().view(1, kv_heads, -1, 1)
    num = num + gate[..., None] * w_num
    den = den + gate * w_den
    new_ring = (keys[:, :, -window:], values[:, :, -window:], all_ok[:, -window:])
    return num, den, new_state, new_ring
