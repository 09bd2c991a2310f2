"""Perplexity on held-out text, in fixed-length blocks."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm


def tokenize_blocks(tokenizer, text: str, block_size: int, max_blocks: int | None = None) -> torch.Tensor:
    """Tokenize `text` and cut it into `(N, block_size)` consecutive blocks (the tail is dropped)."""
    if not text or not text.strip():
        raise ValueError("The text is empty: nothing to evaluate or train on.")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    n = len(ids) // block_size
    if n == 0:
        raise ValueError(f"The text has {len(ids)} tokens, fewer than one block of {block_size}.")
    if max_blocks is not None:
        n = min(n, max_blocks)
    return torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size)


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int = 1, progress: bool = False, desc: str = "eval") -> float:
    """exp(mean next-token cross-entropy) of `model` over every block of `blocks` `(N, T)`."""
    was_training = model.training
    model.eval()
    total_loss, total_tokens = 0.0, 0
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(blocks), batch_size), desc=desc, disable=not progress):
        batch = blocks[start : start + batch_size].to(device)
        logits = model(batch, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_loss += loss.item()
        total_tokens += batch[:, 1:].numel()
    model.train(was_training)
    return math.exp(total_loss / total_tokens)
