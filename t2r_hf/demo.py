"""`t2r-hf demo`: the whole workflow on the real SmolLM2-135M and shipped public-domain books, offline.

convert -> attention transfer -> finetune -> held-out perplexity of the softmax original, the swapped, the
transferred and the finetuned model -> a streamed sample -> a hub-ready folder whose card holds the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

DEMO_PROMPT = "It was a dark and stormy night, and Sherlock Holmes"


def add_demo_args(p: argparse.ArgumentParser) -> None:
    """Arguments of `t2r-hf demo` (defaults fit about 15 minutes on 2 CPU cores)."""
    p.add_argument("--output", default="t2r-demo", help="hub-ready folder to write (default ./t2r-demo)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--feature-dim", type=int, default=32)
    p.add_argument("--feature-map", default="t2r", choices=["t2r", "hedgehog"])
    p.add_argument("--transfer-steps", type=int, default=150, help="attention-transfer steps (one block each)")
    p.add_argument("--finetune-steps", type=int, default=100, help="full-finetuning steps (one block each)")
    p.add_argument("--block-size", type=int, default=512, help="tokens per training and evaluation block")
    p.add_argument("--eval-blocks", type=int, default=8, help="held-out Moby Dick blocks to evaluate on")
    p.add_argument("--transfer-lr", type=float, default=1e-2)
    p.add_argument("--finetune-lr", type=float, default=1e-4)
    p.add_argument("--max-new-tokens", type=int, default=40, help="length of the streamed sample")


def run_demo(
    output: str,
    feature_dim: int = 32,
    feature_map: str = "t2r",
    transfer_steps: int = 150,
    finetune_steps: int = 100,
    block_size: int = 512,
    eval_blocks: int = 8,
    transfer_lr: float = 1e-2,
    finetune_lr: float = 1e-4,
    max_new_tokens: int = 40,
    overwrite: bool = False,
    streamer=None,
    progress: bool = True,
    report=None,
) -> dict:
    """Run the demo pipeline; returns the measured figures (also written to the card and `results.json`).

    `report(stage, message)` is called as stages finish (the CLI prints these); `streamer` receives the sample.
    """
    from .assets import load_smollm2
    from .data import corpus_path
    from .data_io import atomic_output_dir
    from .evaluation import perplexity, tokenize_blocks
    from .finetune import finetune
    from .model_card import write_model_card
    from .modeling_t2r import T2RForCausalLM
    from .transfer import attention_transfer

    report = report or (lambda stage, message: logger.info("%s: %s", stage, message))
    start = time.time()
    results: dict = {}
    with atomic_output_dir(output, overwrite=overwrite) as tmp:
        source, tokenizer = load_smollm2()
        with open(corpus_path("heldout"), encoding="utf-8") as f:
            heldout = tokenize_blocks(tokenizer, f.read(), block_size, max_blocks=eval_blocks)
        with open(corpus_path("train"), encoding="utf-8") as f:
            train = tokenize_blocks(tokenizer, f.read(), block_size)
        results["held-out text"] = f"Moby Dick ch. 1-11, {heldout.numel()} tokens ({len(heldout)} x {block_size})"
        results["ppl softmax (original)"] = round(perplexity(source, heldout, progress=progress, desc="eval softmax"), 2)
        report("softmax", f"held-out perplexity {results['ppl softmax (original)']}")

        torch.manual_seed(0)
        model = T2RForCausalLM.from_softmax_pretrained(source, feature_dim=feature_dim, feature_map=feature_map)
        results["ppl T2R swap only"] = round(perplexity(model, heldout, progress=progress, desc="eval swap"), 2)
        report("swap", f"held-out perplexity {results['ppl T2R swap only']}")

        if transfer_steps > 0:
            history = attention_transfer(model, train, max_steps=transfer_steps, learning_rate=transfer_lr,
                                         progress=progress)
            first, last = (sum(h) / len(h) for h in (history[0], history[-1]))
            results["transfer mean per-layer MSE"] = f"{first:.4g} -> {last:.4g}"
            results["transfer tokens"] = transfer_steps * block_size
            results["ppl T2R + transfer"] = round(perplexity(model, heldout, progress=progress,
                                                             desc="eval transfer"), 2)
            report("transfer", f"MSE {first:.4g} -> {last:.4g}; held-out perplexity {results['ppl T2R + transfer']}")

        if finetune_steps > 0:
            offset = (transfer_steps % len(train)) if transfer_steps else 0  # fresh text after the transfer blocks
            ft_blocks = torch.cat([train[offset:], train[:offset]])
            finetune(model, ft_blocks, os.path.join(tmp, ".trainer"), max_steps=finetune_steps,
                     learning_rate=finetune_lr, progress=progress, logging_steps=max(1, finetune_steps // 5))
            results["finetune tokens"] = finetune_steps * block_size
            results["ppl T2R + transfer + finetune"] = round(
                perplexity(model, heldout, progress=progress, desc="eval finetuned"), 2
            )
            report("finetune", f"held-out perplexity {results['ppl T2R + transfer + finetune']}")
        final_key = [k for k in results if k.startswith("ppl T2R")][-1]
        results["ratio to softmax (final)"] = round(results[final_key] / results["ppl softmax (original)"], 2)

        model.eval()
        report("sample", DEMO_PROMPT)
        inputs = tokenizer(DEMO_PROMPT, return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer,
                             pad_token_id=tokenizer.pad_token_id)
        results["sample"] = tokenizer.decode(out[0], skip_special_tokens=True).replace("\n", " ").replace("|", "/")
        results["minutes"] = round((time.time() - start) / 60, 1)

        import shutil

        shutil.rmtree(os.path.join(tmp, ".trainer"), ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_model_card(model.config, tmp, results)
        with open(os.path.join(tmp, "results.json"), "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    report("saved", f"hub-ready folder {output}")
    return results


def run_demo_cli(args) -> None:
    """`t2r-hf demo`: run the demo, printing progress, the streamed sample and the table of figures."""
    from transformers import TextStreamer

    from .assets import smollm2_gguf

    def report(stage: str, message: str) -> None:
        if stage == "sample":  # the streamer prints the text right after this prefix
            print("[sample] ", end="", flush=True)
        else:
            print(f"[{stage}] {message}", flush=True)

    print("t2r-hf demo: SmolLM2-135M -> T2R, trained on Sherlock Holmes, evaluated on Moby Dick (offline)")
    from transformers import AutoTokenizer

    folder, gguf_file = smollm2_gguf()  # a clear error first if the model is not installed
    streamer = TextStreamer(AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file), skip_prompt=False)
    results = run_demo(
        args.output, feature_dim=args.feature_dim, feature_map=args.feature_map, transfer_steps=args.transfer_steps,
        finetune_steps=args.finetune_steps, block_size=args.block_size, eval_blocks=args.eval_blocks,
        transfer_lr=args.transfer_lr, finetune_lr=args.finetune_lr, max_new_tokens=args.max_new_tokens,
        overwrite=args.overwrite, streamer=streamer, report=report,
    )
    print("\nresults:")
    for key, value in results.items():
        print(f"  {key}: {value}")
