"""Finetuning a T2R model with the stock `transformers.Trainer`: full or LoRA (PEFT), on packed text blocks."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments
from transformers.utils import logging

logger = logging.get_logger(__name__)

# Attention projections per source family, as PEFT target-module names (suffix match).
LORA_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gpt2": ["attn.c_attn", "attn.c_proj"],
    "gpt_neox": ["attention.query_key_value", "attention.dense"],
}


class BlockDataset(Dataset):
    """Fixed-length blocks of token ids `(N, T)` as a dataset of `{"input_ids", "labels"}` examples."""

    def __init__(self, blocks: torch.Tensor):
        if blocks.dim() != 2 or len(blocks) == 0:
            raise ValueError(f"Expected a non-empty (N, T) tensor of token ids, got shape {tuple(blocks.shape)}.")
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


class PackingCollator:
    """Collate examples of any length into fixed-length blocks: concatenate (with `separator_id` between
    documents), cut into `block_size`-token rows, labels = inputs. Tokens past the last full block are dropped."""

    def __init__(self, block_size: int, separator_id: int | None = None):
        if block_size < 2:
            raise ValueError(f"`block_size` must be at least 2, got {block_size}.")
        self.block_size, self.separator_id = block_size, separator_id

    def __call__(self, examples: list[dict]) -> dict:
        stream: list[int] = []
        for example in examples:
            ids = example["input_ids"]
            stream.extend(ids.tolist() if torch.is_tensor(ids) else list(ids))
            if self.separator_id is not None:
                stream.append(self.separator_id)
        n = len(stream) // self.block_size
        if n == 0:
            raise ValueError(f"The batch holds {len(stream)} tokens, fewer than one block of {self.block_size}.")
        blocks = torch.tensor(stream[: n * self.block_size], dtype=torch.long).view(n, self.block_size)
        return {"input_ids": blocks, "labels": blocks.clone()}


def apply_lora(model, r: int = 8, alpha: int = 16, dropout: float = 0.0):
    """Wrap `model` with PEFT LoRA on its attention projections; the feature maps (and, with a sliding window, the
    window factors) are trained in full.

    Raises `ValueError` if the model lacks the projections LoRA targets for its family."""
    from peft import LoraConfig, get_peft_model

    family = getattr(model.config, "source_model_type", None)
    targets = LORA_TARGETS.get(family)
    names = [n for n, _ in model.named_modules()]
    if not targets or not all(any(n == t or n.endswith("." + t) for n in names) for t in targets):
        raise ValueError(
            f"LoRA needs the attention projections {targets or 'of a supported family'} but the model "
            f"({type(model).__name__}, family {family!r}) does not have them all. LoRA applies to T2R models "
            "converted from: " + ", ".join(sorted(LORA_TARGETS)) + "."
        )
    trained_in_full = ["feature_map"] + (["window_factor"] if getattr(model.config, "window_size", 0) else [])
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, modules_to_save=trained_in_full,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def finetune(
    model,
    train_blocks: torch.Tensor,
    output_dir: str,
    max_steps: int = 100,
    learning_rate: float = 1e-4,
    batch_size: int = 1,
    lora: bool = False,
    activation_checkpointing: bool = False,
    progress: bool = True,
    **training_args,
):
    """Finetune `model` on `train_blocks` `(N, T)` with the stock `Trainer`; returns the `Trainer`.

    With `lora=True` the model is wrapped with PEFT LoRA first (`trainer.model` is then the PEFT model).
    Extra keywords go to `TrainingArguments`.
    """
    if lora:
        model = apply_lora(model)
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=max_steps,
        learning_rate=learning_rate,
        per_device_train_batch_size=batch_size,
        lr_scheduler_type=training_args.pop("lr_scheduler_type", "cosine"),
        warmup_steps=training_args.pop("warmup_steps", min(10, max_steps // 10)),
        logging_steps=training_args.pop("logging_steps", max(1, max_steps // 10)),
        save_strategy=training_args.pop("save_strategy", "no"),
        report_to=training_args.pop("report_to", "none"),
        disable_tqdm=not progress,
        activation_checkpointing=activation_checkpointing,
        use_cpu=training_args.pop("use_cpu", not torch.cuda.is_available()),
        **training_args,
    )
    trainer = Trainer(model=model, args=args, train_dataset=BlockDataset(train_blocks))
    trainer.train()
    return trainer
