"""Fused GPU kernels for T2R linear attention, from flash-linear-attention (`fla`), when available.

On CUDA with `fla` installed (`pip install "t2r-hf[gpu]"`), training and prefill use fla's chunked Triton
kernel and decoding its fused recurrent kernel; everywhere else the pure-PyTorch forms in `t2r_hf.ops` run.

fla's own `normalize=True` divides by the unclamped `q . z`. T2R divides by `max(q . z, eps)` and keeps the
normaliser state `z` beside `S`, so each attention makes two kernel calls with the same queries and keys: one on
the values (numerator `q . S`, state `S`) and one on a column of ones padded with zeros to 16 columns
(denominator `q . z`, state `z`; fla's bf16 kernels need an even value width). Appending the ones column to the
values instead would make one call, but gives odd widths (D + 1) for which fla 0.6's bf16 kernels fault. The eps
clamp and the division then happen in fp32 here, as in the PyTorch path. fla's simple-GLA kernels take as many
key/value heads as query heads, so grouped-query attention repeats keys and values over each group (the state
of a group is then the same for all its query heads, and one copy per key/value head is kept).

Precision: both kernels run in fp32 whatever the model's dtype (inputs are cast, outputs cast back by the
caller), like the PyTorch path, which also computes attention in fp32. fla-core 0.6.0's bf16 chunk kernels hit
illegal memory accesses on an H100 for feature size 32 with several value widths, so half-precision inputs are
never handed to them. Which path runs is chosen by the `kernel` option of `T2RConfig` (`"auto"`, `"torch"`,
`"fla"`) and logged once.

Status, measured on an H100 (bench/results/gpu, tests/test_gpu.py): the fp32 kernels match the PyTorch path
(outputs, gradients and final states, with and without an initial state), but neither made decoding faster
(decoding is bound by per-layer launch overhead, not by attention arithmetic), and in training (bf16 kernels, as
measured before they were replaced by fp32) they matched it up to 8k tokens and were 1.2x faster at 16k on
SmolLM2's shape. So `"auto"` keeps the PyTorch path; `"fla"` opts in to the kernels.
"""

from __future__ import annotations

import functools

import torch
from transformers.utils import logging

from .configuration_t2r import check_kernel

logger = logging.get_logger(__name__)

_DEN_WIDTH = 16  # value width of the denominator call: a ones column and zero padding


@functools.lru_cache(maxsize=1)
def fla_available() -> bool:
    """Whether flash-linear-attention's simple-GLA kernels can be imported (needs `fla-core` and Triton)."""
    try:
        from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla  # noqa: F401
    except Exception:  # noqa: BLE001 - missing package, missing Triton or a broken install all mean "no"
        return False
    return True


_announced: set[str] = set()


def _announce(choice: str, reason: str) -> None:
    if choice not in _announced:
        _announced.add(choice)
        logger.info(f"T2R linear attention uses the {choice} path ({reason}).")


def select_kernel(requested: str, tensor: torch.Tensor) -> str:
    """Resolve the `kernel` option for a tensor: `"fla"` or `"torch"`. Logs the choice once per choice.

    `"auto"` currently resolves to PyTorch everywhere (see the module docstring for the measurements behind
    that); `"fla"` insists on the kernels and raises where they cannot run."""
    check_kernel(requested)
    if requested == "torch":
        _announce("PyTorch", "kernel='torch'")
        return "torch"
    usable = tensor.is_cuda and fla_available()
    if requested == "auto":
        # Measured on an H100 (fla-core 0.6.0, Triton 3.6): fp32 chunk kernels matched the PyTorch path, bf16 chunk
        # kernels hit illegal memory accesses for some shapes, and decoding through the kernels was slower. Until
        # the whole GPU suite has passed on a device, "auto" stays on the verified PyTorch path; "fla" opts in.
        _announce("PyTorch", "kernel='auto'" + ("; fla is installed: kernel='fla' opts in to its kernels" if usable else ""))
        return "torch"
    if not usable:  # kernel="fla" from here on
        why = "the tensors are not on a CUDA device" if not tensor.is_cuda else "`fla` is not installed"
        raise RuntimeError(
            f"kernel='fla' was requested but {why}. Install the GPU extra (`pip install \"t2r-hf[gpu]\"`) and run "
            "on CUDA, or set `model.config.kernel = 'auto'` (or 'torch') to use the PyTorch path."
        )
    _announce("flash-linear-attention (Triton)", "kernel='fla', CUDA and fla available")
    return "fla"


def fla_numerator_denominator(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: tuple[torch.Tensor, torch.Tensor] | None = None,
    recurrent: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """fla's kernels on T2R's layout; same contract as `t2r_hf.ops.chunked_numerator_denominator`.

    q: (B, Hq, T, F), k: (B, Hkv, T, F), v: (B, Hkv, T, D), state `(S (B, Hkv, F, D), z (B, Hkv, F))`.
    Returns `num (B, Hkv, G, T, D)` and `den (B, Hkv, G, T)` in fp32 and the new fp32 state."""
    try:  # inside try/except so that remote code (transformers' `check_imports`) does not require fla
        from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla
    except ImportError as err:
        raise RuntimeError("The fla kernels need flash-linear-attention: pip install 't2r-hf[gpu]'.") from err

    batch, num_q, length, feat = q.shape
    num_kv, dim = k.shape[1], v.shape[-1]
    group = num_q // num_kv
    dtype = torch.float32  # see the module docstring: fla-core 0.6.0's bf16 chunk kernels fault
    kernel = fused_recurrent_simple_gla if recurrent else chunk_simple_gla

    def heads_last(x: torch.Tensor) -> torch.Tensor:  # (B, Hkv, T, X) -> (B, T, Hq, X)
        if group > 1:
            x = x.repeat_interleave(group, dim=1)
        return x.transpose(1, 2).to(dtype)

    def per_q_head(x: torch.Tensor) -> torch.Tensor:  # state (B, Hkv, F, X) -> (B, Hq, F, X), fp32
        x = x.float()
        return (x.repeat_interleave(group, dim=1) if group > 1 else x).contiguous()

    q_in, k_in = q.transpose(1, 2).to(dtype), heads_last(k)
    # numerator and state S: the values as they are
    num, s_final = kernel(q=q_in, k=k_in, v=heads_last(v), scale=1.0, output_final_state=True,
                          initial_state=None if state is None else per_q_head(state[0]))
    # denominator and state z: a ones column, padded to 16 columns (a width fla's kernels are tested with)
    ones = v.new_zeros(batch, num_kv, length, _DEN_WIDTH)
    ones[..., 0] = 1
    z0 = None
    if state is not None:
        z0 = torch.zeros(*state[1].shape, _DEN_WIDTH, device=state[1].device, dtype=torch.float32)
        z0[..., 0] = state[1].float()
        z0 = per_q_head(z0)
    den, z_final = kernel(q=q_in, k=k_in, v=heads_last(ones), scale=1.0, initial_state=z0, output_final_state=True)
    num = num.transpose(1, 2).float().reshape(batch, num_kv, group, length, dim)
    den = den[..., 0].transpose(1, 2).float().reshape(batch, num_kv, group, length)
    return num, den, (s_final[:, ::group].float(), z_final[:, ::group, :, 0].float())  # one copy per kv head
