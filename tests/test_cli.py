"""The `t2r-hf` command line: every subcommand end to end, its errors, and push at the hub-client boundary."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from t2r_hf import T2RForCausalLM
from t2r_hf.cli import main

SUBCOMMANDS = ["convert", "transfer", "finetune", "eval", "generate", "push", "demo", "bench"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny softmax Llama and its T2R conversion, both saved with the real SmolLM2 tokenizer, plus text."""
    from t2r_hf.assets import smollm2_gguf

    root = tmp_path_factory.mktemp("cli")
    from transformers import AutoTokenizer

    folder, gguf_file = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    softmax = LlamaForCausalLM(config)
    softmax.save_pretrained(root / "softmax")
    tokenizer.save_pretrained(root / "softmax")
    text = root / "text.txt"
    from t2r_hf.data import corpus_path

    text.write_text(open(corpus_path("heldout"), encoding="utf-8").read()[:20_000])
    return root, text


def _run(*args) -> int:
    return main([str(a) for a in args])


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: t2r-hf " + command in capsys.readouterr().out


def test_workflow_convert_transfer_finetune_eval_generate(workspace, capsys):
    root, text = workspace
    converted, transferred, finetuned = root / "t2r", root / "transferred", root / "finetuned"
    assert _run("convert", root / "softmax", converted, "--feature-dim", 8) == 0
    assert json.loads((converted / "config.json").read_text())["feature_dim"] == 8
    assert (converted / "tokenizer.json").exists()

    assert _run("transfer", converted, "--data", text, "--output", transferred, "--max-steps", 6,
                "--block-size", 64) == 0
    out = capsys.readouterr().out
    assert "layer   0:" in out and "mean per-layer MSE:" in out
    a = AutoModelForCausalLM.from_pretrained(converted).state_dict()
    b = AutoModelForCausalLM.from_pretrained(transferred).state_dict()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(".feature_map." in k for k in changed)

    assert _run("finetune", transferred, "--data", text, "--output", finetuned, "--max-steps", 4,
                "--block-size", 64, "--learning-rate", 1e-3) == 0
    assert isinstance(AutoModelForCausalLM.from_pretrained(finetuned), T2RForCausalLM)

    assert _run("eval", finetuned, "--data", text, "--block-size", 64, "--max-blocks", 3) == 0
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("perplexity: ")][-1]
    assert 1 < float(line.split(": ")[1]) < 1e6

    assert _run("generate", finetuned, "--prompt", "Call me Ishmael", "--max-new-tokens", 5) == 0
    assert "Call me Ishmael" in capsys.readouterr().out


def test_convert_window_and_softmax_layers_then_transfer(workspace, tmp_path, capsys):
    root, text = workspace
    out = tmp_path / "hybrid"
    assert _run("convert", root / "softmax", out, "--feature-dim", 8, "--window-size", 16, "--softmax-layers", 0) == 0
    assert "1 of 2 layers to T2R, window 16, softmax kept in layers [0]" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["window_size"] == 16 and config["softmax_layers"] == [0]
    assert _run("transfer", out, "--data", text, "--output", tmp_path / "t", "--max-steps", 2, "--block-size",
                64) == 0
    printed = capsys.readouterr().out
    assert "layer   1:" in printed and "layer   0:" not in printed
    a = AutoModelForCausalLM.from_pretrained(out).state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "t").state_dict()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert {k.split(".")[-2] for k in changed} == {"feature_map", "window_factor"}


@pytest.mark.parametrize("args,message", [(["--softmax-layers", "5"], "out of range"),
                                          (["--softmax-layers", "0", "1"], "nothing would be converted"),
                                          (["--window-size", "-3"], "window_size")])
def test_convert_refuses_bad_window_options(workspace, tmp_path, capsys, args, message):
    root, _ = workspace
    assert _run("convert", root / "softmax", tmp_path / "bad", *args) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_finetune_lora_writes_merged_model_and_adapter(workspace):
    root, text = workspace
    if not (root / "t2r").exists():
        assert _run("convert", root / "softmax", root / "t2r", "--feature-dim", 8) == 0
    out = root / "lora"
    assert _run("finetune", root / "t2r", "--data", text, "--output", out, "--max-steps", 3, "--block-size", 64,
                "--lora") == 0
    assert (out / "lora_adapter" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(merged, T2RForCausalLM)
    assert not any("lora" in k for k in merged.state_dict())


@pytest.mark.parametrize(
    "args,message",
    [
        (["--data", "{missing}"], "not found"),
        (["--data", "{empty}"], "empty"),
    ],
    ids=["missing-data", "empty-data"],
)
@pytest.mark.parametrize("command", ["transfer", "finetune"])
def test_bad_data_is_refused_and_nothing_written(workspace, tmp_path, capsys, command, args, message):
    root, _ = workspace
    if not (root / "t2r").exists():
        assert _run("convert", root / "softmax", root / "t2r", "--feature-dim", 8) == 0
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    args = [a.format(missing=tmp_path / "nope.txt", empty=empty) for a in args]
    out = tmp_path / "out"
    assert _run(command, root / "t2r", *args, "--output", out, "--max-steps", 1) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_transfer_refuses_a_softmax_model(workspace, tmp_path, capsys):
    root, text = workspace
    assert _run("transfer", root / "softmax", "--data", text, "--output", tmp_path / "o") == 2
    assert "not a T2R model" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_lora_on_model_without_expected_modules(workspace, tmp_path, capsys, monkeypatch):
    root, text = workspace
    if not (root / "t2r").exists():
        assert _run("convert", root / "softmax", root / "t2r", "--feature-dim", 8) == 0
    from t2r_hf import finetune as finetune_module

    monkeypatch.setitem(finetune_module.LORA_TARGETS, "llama", ["query", "value"])  # names this model lacks
    assert _run("finetune", root / "t2r", "--data", text, "--output", tmp_path / "o", "--lora") == 2
    assert "LoRA needs the attention projections" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_existing_output_needs_overwrite(workspace, tmp_path, capsys):
    root, _ = workspace
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert _run("convert", root / "softmax", out) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "keep.txt").read_text() == "precious"


def test_push_commits_everything_and_dry_run_uploads_nothing(workspace, monkeypatch, capsys):
    root, _ = workspace
    if not (root / "t2r").exists():
        assert _run("convert", root / "softmax", root / "t2r", "--feature-dim", 8) == 0
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, **kw: calls.append(("create_repo", repo_id, kw)))
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit",
                        lambda self, repo_id, operations, **kw: calls.append(("create_commit", repo_id, operations)))

    assert _run("push", root / "t2r", "me/tiny-t2r", "--dry-run") == 0
    listed = capsys.readouterr().out
    assert calls == [] and "config.json" in listed and "README.md" in listed

    assert _run("push", root / "t2r", "me/tiny-t2r", "--private") == 0
    assert [c[0] for c in calls] == ["create_repo", "create_commit"]
    assert calls[0][2]["private"] is True
    ops = {op.path_in_repo: op for op in calls[1][2]}
    for needed in ("config.json", "model.safetensors", "modeling_t2r.py", "configuration_t2r.py", "attention.py",
                   "cache.py", "ops.py", "feature_maps.py", "README.md", "tokenizer.json"):
        assert needed in ops, needed
    config = json.loads(open(ops["config.json"].path_or_fileobj).read())
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
    assert "- linear-attention" in open(ops["README.md"].path_or_fileobj).read()


def test_push_refuses_non_t2r_folder(workspace, capsys):
    root, _ = workspace
    assert _run("push", root / "softmax", "me/x", "--dry-run") == 2
    assert "not a T2R model" in capsys.readouterr().err


def test_console_script_is_installed():
    result = subprocess.run(["t2r-hf", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "convert" in result.stdout


def test_accelerate_two_process_finetune(workspace, tmp_path):
    """The same `finetune` under `accelerate launch` with 2 CPU processes (DDP over gloo); the result loads.

    `--multi_gpu` is accelerate's flag for its torchrun launcher; without CUDA the Trainer runs DDP on CPU (gloo).
    (`--cpu --num_processes 2` would silently start one process unless an MPI host file is configured.)"""
    root, text = workspace
    if not (root / "t2r").exists():
        assert _run("convert", root / "softmax", root / "t2r", "--feature-dim", 8) == 0
    out = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "t2r_hf.cli", "finetune", str(root / "t2r"),
           "--data", str(text), "--output", str(out), "--max-steps", "3", "--block-size", "64"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "saved ->" in result.stdout
    assert "trained on 2 process(es)" in result.stdout  # really DDP, not two independent runs
    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model, T2RForCausalLM)
    assert not (tmp_path / "ddp.partial").exists()
