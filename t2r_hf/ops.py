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
