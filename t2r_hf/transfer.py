"""Attention transfer (LoLCATs, Zhang et al. 2024): train only the feature maps so that each layer's linear
attention reproduces the softmax attention of the same weights on the same inputs.

The teacher is the model itself: under `attention_transfer_mode`, every attention computes both its softmax
output (exact, from the same queries/keys/values) and its T2R output, records their MSE, and passes the
*softmax* output on. The hidden states are therefore exactly the softmax model's (each layer learns from its
true inputs) and no second copy of the model is held in memory.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn
from transformers import AttentionInterface, Trainer
from transformers.utils import logging

from .attention import ATTN_IMPLEMENTATION, t2r_attention_forward
from .ops import softmax_attention

logger = logging.get_logger(__name__)

TRANSFER_IMPLEMENTATION = "t2r_transfer"


def transfer_attention_forward(module, query, key, value, attention_mask, t2r_transfer_losses=None, **kwargs):
    """Attention function used during transfer: returns the softmax output, records MSE(T2R, softmax).

    Layers kept as softmax (`softmax_layers`) just return their softmax output and record nothing."""
    scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
    padding_mask = kwargs.get("t2r_padding_mask")
    kwargs.pop("t2r_cache", None)
    with torch.no_grad():
        teacher = softmax_attention(query, key, value, scaling, padding_mask, kwargs.get("sliding_window"))
    if getattr(module, "t2r_softmax", False):
        return teacher, None
    student, _ = t2r_attention_forward(module, query.detach(), key.detach(), value.detach(), attention_mask, **kwargs)
    error = (student.float() - teacher.float()).pow(2)
    if padding_mask is not None:
        keep = padding_mask[:, :, None, None].to(error.dtype)
        mse = (error * keep).sum() / (keep.sum() * error.shape[2] * error.shape[3]).clamp(min=1)
    else:
        mse = error.mean()
    if t2r_transfer_losses is not None:
        t2r_transfer_losses[module.layer_idx] = mse
    return teacher.to(query.dtype), None


AttentionInterface.register(TRANSFER_IMPLEMENTATION, transfer_attention_forward)


@contextlib.contextmanager
def attention_transfer_mode(model):
    """Within this context, `model`'s attentions run as softmax teachers that record the T2R error."""
    config = model.source_model.config
    config._attn_implementation = TRANSFER_IMPLEMENTATION
    try:
        yield
    finally:
        config._attn_implementation = ATTN_IMPLEMENTATION


def _require_t2r(model) -> None:
    if not hasattr(model, "t2r_parameters") or not hasattr(model, "source_model"):
        raise TypeError(
            f"Attention transfer needs a T2R model, got {type(model).__name__}. Convert it first with "
            "`T2RForCausalLM.from_softmax_pretrained(...)` (or `t2r-hf convert`)."
        )
    if not model.t2r_parameters():
        raise ValueError(
            f"The model's feature map {model.config.feature_map!r} has no parameters to train; attention transfer "
            "needs a learned map ('t2r' or 'hedgehog')."
        )


def transfer_losses(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-layer MSE between T2R and softmax attention outputs on `input_ids`, one entry per converted layer
    (layers kept as softmax have none), in layer order.

    Gradients flow to the T2R parameters only (feature maps and window factors). The forward stops after the last layer (no LM head)."""
    _require_t2r(model)
    losses: dict[int, torch.Tensor] = {}
    backbone = model.source_model.base_model
    with attention_transfer_mode(model):
        mask = attention_mask if attention_mask is not None and not bool(attention_mask.all()) else None
        positions = None
        if mask is not None:
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        backbone(input_ids=input_ids, position_ids=positions, use_cache=False, t2r_padding_mask=mask,
                 t2r_transfer_losses=losses)
    return torch.stack([losses[i] for i in sorted(losses)])


def attention_transfer(
    model,
    blocks: torch.Tensor,
    max_steps: int = 100,
    learning_rate: float = 1e-2,
    batch_size: int = 1,
    progress: bool = True,
    log_every: int = 10,
) -> list[list[float]]:
    """Train only the T2R parameters of `model` (feature maps, and window factors with a sliding window) on `blocks`
    `(N, T)` to mimic its softmax attention.

    Cycles through the blocks for `max_steps` AdamW steps and returns the per-layer MSE of every step (a list of
    one float per converted layer per step). Every other parameter is left untouched (they are frozen during the run).

    Example:
    ```python
    >>> history = attention_transfer(model, blocks, max_steps=80)   # doctest: +SKIP
    >>> sum(history[0]) / len(history[0]), sum(history[-1]) / len(history[-1])  # doctest: +SKIP
    ```
    """
    from tqdm.auto import tqdm

    _require_t2r(model)
    if blocks.dim() != 2 or len(blocks) == 0:
        raise ValueError(f"`blocks` must be a non-empty (N, T) tensor of token ids, got shape {tuple(blocks.shape)}.")
    params = model.t2r_parameters()
    trainable = {id(p) for p in params}
    frozen = [p for p in model.parameters() if id(p) not in trainable and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / max_steps)))
    device = params[0].device
    was_training = model.training
    model.train()
    history: list[list[float]] = []
    bar = tqdm(range(max_steps), desc="attention transfer", disable=not progress)
    try:
        for step in bar:
            start = (step * batch_size) % len(blocks)
            batch = blocks[start : start + batch_size].to(device)
            losses = transfer_losses(model, batch)
            losses.sum().backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            history.append([v.item() for v in losses.detach()])
            mean = sum(history[-1]) / len(history[-1])
            bar.set_postfix(mse=f"{mean:.4g}")
            if log_every and (step % log_every == 0 or step == max_steps - 1):
                logger.info("transfer step %d: mean per-layer MSE %.5g", step, mean)
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
    return history


class AttentionTransferTrainer(Trainer):
    """A `transformers.Trainer` whose loss is the attention-transfer loss (sum of per-layer MSEs).

    Use it with any dataset/collator that yields `input_ids` (and optionally `attention_mask`); only the T2R
    parameters (feature maps, window factors) are trained (the others are frozen on construction). The mean per-layer MSE is logged as `loss`.
    """

    def __init__(self, model=None, *args, **kwargs):
        _require_t2r(model)
        trainable = {id(p) for p in model.t2r_parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) in trainable)
        super().__init__(model, *args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Through the (possibly DDP-wrapped) model, so gradients of the feature maps are synchronised.
        recorded: dict[int, torch.Tensor] = {}
        with attention_transfer_mode(self.accelerator.unwrap_model(model)):
            model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), use_cache=False,
                  logits_to_keep=1, t2r_transfer_losses=recorded)
        losses = torch.stack([recorded[i] for i in sorted(recorded)])
        loss = losses.sum()
        return (loss, {"layer_losses": losses.detach()}) if return_outputs else loss


def feature_map_modules(model) -> list[nn.Module]:
    """Every feature-map module of a T2R model, in layer order."""
    return [attn.feature_map for attn in model._feature_map_owners]
