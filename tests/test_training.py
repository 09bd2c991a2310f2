"""Attention transfer, finetuning (full and LoRA) and their Trainer integration, on tiny models."""

from __future__ import annotations

import pytest
import torch
from helpers import random_ids, tiny_t2r
from transformers import TrainingArguments

from t2r_hf.evaluation import perplexity
from t2r_hf.finetune import BlockDataset, PackingCollator, apply_lora, finetune
from t2r_hf.transfer import AttentionTransferTrainer, attention_transfer, transfer_losses


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_transfer_halves_mse_and_touches_only_feature_maps(family):
    model = tiny_t2r(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    blocks = random_ids(8, 48, seed=1)
    with torch.no_grad():
        start = transfer_losses(model, blocks[:4]).mean().item()
    history = attention_transfer(model, blocks, max_steps=30, learning_rate=1e-2, progress=False)
    assert len(history) == 30 and len(history[0]) == model.config.num_hidden_layers
    with torch.no_grad():
        end = transfer_losses(model, blocks[:4]).mean().item()
    assert end <= 0.5 * start, (start, end)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".feature_map." in k for k in changed)
    assert all(p.requires_grad for p in model.parameters())  # frozen parameters are released afterwards


def test_transfer_teacher_is_the_softmax_model():
    """Under transfer mode the hidden states are exactly the softmax source's."""
    from helpers import tiny_source

    from t2r_hf.transfer import attention_transfer_mode

    source = tiny_source("qwen2")
    ids = random_ids(2, 16)
    with torch.no_grad():
        expected = source.model(ids).last_hidden_state.clone()
        from t2r_hf import T2RForCausalLM

        model = T2RForCausalLM.from_softmax_pretrained(source, feature_dim=8)
        with attention_transfer_mode(model):
            got = model.source_model.model(ids, t2r_transfer_losses={}).last_hidden_state
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_transfer_with_padding_ignores_padded_positions():
    model = tiny_t2r("llama")
    ids = random_ids(1, 12)
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 12, dtype=torch.long)], 1)
    with torch.no_grad():
        torch.testing.assert_close(transfer_losses(model, padded, mask), transfer_losses(model, ids),
                                   atol=1e-6, rtol=1e-4)


def test_transfer_refuses_non_t2r_and_parameter_free_maps():
    from helpers import tiny_source

    with pytest.raises(TypeError, match="T2R model"):
        attention_transfer(tiny_source("llama"), random_ids(2, 8))
    with pytest.raises(ValueError, match="no parameters"):
        attention_transfer(tiny_t2r("llama", feature_map="elu"), random_ids(2, 8))


def test_transfer_trainer_lowers_loss(tmp_path):
    model = tiny_t2r("llama")
    blocks = random_ids(16, 32, seed=2)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=25, learning_rate=1e-2, per_device_train_batch_size=2,
                             logging_steps=5, report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        start = transfer_losses(model, blocks[:4]).mean().item()
    AttentionTransferTrainer(model=model, args=args, train_dataset=BlockDataset(blocks)).train()
    with torch.no_grad():
        end = transfer_losses(model, blocks[:4]).mean().item()
    assert end < 0.5 * start
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(".feature_map." in k for k in changed)


def test_full_finetune_lowers_held_in_perplexity(tmp_path):
    model = tiny_t2r("gpt2")
    blocks = random_ids(4, 32, seed=3)
    before = perplexity(model, blocks)
    finetune(model, blocks, str(tmp_path), max_steps=30, learning_rate=3e-3, progress=False)
    after = perplexity(model, blocks)
    assert after < 0.8 * before, (before, after)


def test_lora_adapters_reload_and_merge(tmp_path):
    from peft import PeftModel

    model = tiny_t2r("llama")
    blocks = random_ids(4, 32, seed=4)
    trainer = finetune(model, blocks, str(tmp_path / "run"), max_steps=10, learning_rate=1e-2, lora=True,
                       activation_checkpointing=True, progress=False)
    peft_model = trainer.model.eval()
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("feature_map" in n for n in trainable)
    assert not any("mlp" in n for n in trainable)
    ids = random_ids(2, 9, seed=5)
    with torch.no_grad():
        expected = peft_model(ids).logits.clone()
    peft_model.save_pretrained(tmp_path / "adapter")

    reloaded = PeftModel.from_pretrained(tiny_t2r("llama"), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, atol=1e-5, rtol=1e-5)
        merged = reloaded.merge_and_unload()
        assert type(merged).__name__ == "T2RForCausalLM"
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(expected, tiny_t2r("llama")(ids).logits, atol=1e-3)  # the adapters did learn


def test_lora_refuses_models_without_projections():
    class NoProjections(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"source_model_type": "llama"})()
            self.mlp = torch.nn.Linear(4, 4)

    with pytest.raises(ValueError, match="q_proj"):
        apply_lora(NoProjections())


def test_packing_collator():
    collate = PackingCollator(block_size=4, separator_id=0)
    batch = collate([{"input_ids": [5, 6, 7]}, {"input_ids": torch.tensor([8, 9])}, {"input_ids": [1, 2, 3, 4]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [8, 9, 0, 1], [2, 3, 4, 0]]
    assert torch.equal(batch["labels"], batch["input_ids"])
    with pytest.raises(ValueError, match="fewer than one block"):
        collate([{"input_ids": [1]}])
