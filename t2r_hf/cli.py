"""`t2r-hf`: the whole T2R workflow on the command line (convert, transfer, finetune, eval, generate, push,
demo, bench). Only this module prints; the library logs."""

from __future__ import annotations

import argparse
import os
import sys


def _add_data_args(p: argparse.ArgumentParser, block_size: int = 512) -> None:
    p.add_argument("--data", required=True, help="plain-text file, JSON-lines file ('text' field) or dataset name")
    p.add_argument("--block-size", type=int, default=block_size, help="tokens per training/eval block")
    p.add_argument("--max-blocks", type=int, default=None, help="use at most this many blocks of the data")


def _add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", required=True, help="folder to write the model to (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")


def build_parser() -> argparse.ArgumentParser:
    """The `t2r-hf` argument parser."""
    parser = argparse.ArgumentParser(
        prog="t2r-hf", description="Convert softmax-attention LMs into T2R recurrent models, train and share them."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("convert", help="convert a softmax causal LM into a T2R model")
    p.add_argument("src", help="hub id or folder of the softmax model")
    p.add_argument("out", help="folder to write the T2R model to")
    p.add_argument("--feature-dim", type=int, default=32, help="feature size k (default 32)")
    p.add_argument("--feature-map", default="t2r", choices=["t2r", "elu", "hedgehog"])
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--window-size", type=int, default=0, metavar="W",
                   help="sliding-window hybrid: softmax over the last W tokens, linear beyond (default 0: pure T2R)")
    p.add_argument("--softmax-layers", type=int, nargs="+", default=[], metavar="I",
                   help="layer indices that keep their softmax attention (and a growing KV cache)")
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside SRC")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("transfer", help="attention transfer: train the feature maps to mimic softmax attention")
    p.add_argument("model", help="T2R model folder or hub id")
    _add_data_args(p)
    _add_output_args(p)
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--learning-rate", type=float, default=1e-2)
    p.add_argument("--batch-size", type=int, default=1)

    p = sub.add_parser("finetune", help="finetune a T2R model with the HF Trainer (full or LoRA)")
    p.add_argument("model", help="T2R model folder or hub id")
    _add_data_args(p)
    _add_output_args(p)
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--lora", action="store_true", help="train LoRA adapters on the attention projections")
    p.add_argument("--activation-checkpointing", action="store_true")

    p = sub.add_parser("eval", help="perplexity on held-out text")
    p.add_argument("model", help="model folder or hub id (T2R or softmax)")
    _add_data_args(p)
    p.add_argument("--gguf-file", default=None)

    p = sub.add_parser("generate", help="generate text, streamed as it comes")
    p.add_argument("model", help="model folder or hub id")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--num-beams", type=int, default=1)

    p = sub.add_parser("push", help="upload a saved T2R folder with its card to the hub")
    p.add_argument("dir", help="saved T2R folder")
    p.add_argument("repo_id", help="ORG/NAME on the hub")
    p.add_argument("--private", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="list what would be uploaded; upload nothing")
    p.add_argument("--token", default=None)

    p = sub.add_parser("demo", help="the whole workflow on SmolLM2-135M and shipped books, offline")
    from .demo import add_demo_args

    add_demo_args(p)

    p = sub.add_parser("bench", help="benchmarks against the softmax original (see bench/)")
    from .bench import add_bench_args

    add_bench_args(p)
    return parser


def _load_tokenizer(model_id: str, gguf_file: str | None = None):
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        return AutoTokenizer.from_pretrained(model_id, **kwargs)
    except (OSError, ValueError) as err:
        raise ValueError(f"No tokenizer could be loaded from {model_id!r}: {err}") from None


def _load_t2r(model_id: str):
    """Load a T2R model, refusing anything else before reading weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import t2r_hf  # noqa: F401  (registers the model type)

    config = AutoConfig.from_pretrained(model_id)
    if config.model_type != "t2r":
        raise ValueError(
            f"{model_id!r} is a {config.model_type!r} model, not a T2R model; convert it first with "
            f"`t2r-hf convert {model_id} OUT`."
        )
    return AutoModelForCausalLM.from_pretrained(model_id)


def _blocks(args, tokenizer):
    from .data_io import load_text
    from .evaluation import tokenize_blocks

    return tokenize_blocks(tokenizer, load_text(args.data), args.block_size, args.max_blocks)


def cmd_convert(args) -> None:
    from .data_io import atomic_output_dir
    from .modeling_t2r import T2RForCausalLM

    loader = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    model = T2RForCausalLM.from_softmax_pretrained(
        args.src,
        feature_dim=args.feature_dim,
        feature_map=args.feature_map,
        chunk_size=args.chunk_size,
        window_size=args.window_size,
        softmax_layers=args.softmax_layers,
        **loader,
    )
    tokenizer = _load_tokenizer(args.src, args.gguf_file)
    with atomic_output_dir(args.out, overwrite=args.overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    config = model.config
    kept = f", softmax kept in layers {config.softmax_layers}" if config.softmax_layers else ""
    window = f", window {config.window_size}" if config.window_size else ""
    print(f"converted {args.src} ({config.source_model_type}, {len(config.linear_layers)} of "
          f"{config.num_hidden_layers} layers to T2R{window}{kept}) -> {args.out}")


def cmd_transfer(args) -> None:
    from .data_io import atomic_output_dir
    from .transfer import attention_transfer

    model = _load_t2r(args.model)
    tokenizer = _load_tokenizer(args.model)
    blocks = _blocks(args, tokenizer)
    with atomic_output_dir(args.output, overwrite=args.overwrite) as tmp:
        history = attention_transfer(model, blocks, max_steps=args.max_steps, learning_rate=args.learning_rate,
                                     batch_size=args.batch_size)
        first, last = history[0], history[-1]
        print("per-layer MSE (first step -> last step):")
        for i, a, b in zip(model.config.linear_layers, first, last):
            print(f"  layer {i:3d}: {a:.5g} -> {b:.5g}")
        print(f"mean per-layer MSE: {sum(first) / len(first):.5g} -> {sum(last) / len(last):.5g}")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    print(f"saved -> {args.output}")


def _launcher_rank() -> int:
    """This process's global rank as set by `accelerate launch`/torchrun (RANK) or MPI; 0 when not launched.

    Read from the environment because the distributed state is only set up once the Trainer exists, after the
    output folder is prepared (an early `PartialState()` would pin a non-distributed state)."""
    for name in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def cmd_finetune(args) -> None:
    from .data_io import atomic_output_dir
    from .finetune import apply_lora, finetune

    model = _load_t2r(args.model)
    if args.lora:
        model = apply_lora(model)  # fails fast, before reading data, if the projections are missing
    tokenizer = _load_tokenizer(args.model)
    blocks = _blocks(args, tokenizer)
    main = _launcher_rank() == 0
    with atomic_output_dir(args.output, overwrite=args.overwrite, is_main_process=main) as tmp:
        trainer = finetune(model, blocks, os.path.join(tmp, "trainer"), max_steps=args.max_steps,
                           learning_rate=args.learning_rate, batch_size=args.batch_size,
                           activation_checkpointing=args.activation_checkpointing)
        trainer.accelerator.wait_for_everyone()
        if main:
            import shutil

            shutil.rmtree(os.path.join(tmp, "trainer"), ignore_errors=True)
            final = trainer.accelerator.unwrap_model(trainer.model)
            if args.lora:
                final.save_pretrained(os.path.join(tmp, "lora_adapter"))
                final = final.merge_and_unload()
            final.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        trainer.accelerator.wait_for_everyone()
    if main:
        print(f"trained on {trainer.accelerator.num_processes} process(es)")
        print(f"final training loss: {trainer.state.log_history[-1].get('train_loss', float('nan')):.4f}")
        print(f"saved -> {args.output}")


def cmd_eval(args) -> None:
    from transformers import AutoModelForCausalLM

    import t2r_hf  # noqa: F401

    from .evaluation import perplexity

    kwargs = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    tokenizer = _load_tokenizer(args.model, args.gguf_file)
    blocks = _blocks(args, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(args.model, **kwargs)
    print(f"perplexity: {perplexity(model, blocks, progress=True):.4f}")


def cmd_generate(args) -> None:
    from transformers import AutoModelForCausalLM, TextStreamer

    import t2r_hf  # noqa: F401

    tokenizer = _load_tokenizer(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    inputs = tokenizer(args.prompt, return_tensors="pt")
    sample = args.temperature > 0
    options = dict(max_new_tokens=args.max_new_tokens, do_sample=sample, num_beams=args.num_beams,
                   pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    if sample:
        options.update(temperature=args.temperature, top_p=args.top_p)
    if args.num_beams == 1:
        options["streamer"] = TextStreamer(tokenizer, skip_prompt=False)
        model.generate(**inputs, **options)
    else:  # beams are only final at the end: print once
        out = model.generate(**inputs, **options)
        print(tokenizer.decode(out[0], skip_special_tokens=True))


def cmd_push(args) -> None:
    from .hub import push_folder

    result = push_folder(args.dir, args.repo_id, private=args.private, dry_run=args.dry_run, token=args.token)
    if args.dry_run:
        print(f"dry run: would upload {len(result)} files to {args.repo_id}:")
        for f in result:
            print(f"  {f}")
    else:
        print(f"pushed {args.dir} -> {args.repo_id} ({getattr(result, 'commit_url', result)})")


COMMANDS = {
    "convert": cmd_convert,
    "transfer": cmd_transfer,
    "finetune": cmd_finetune,
    "eval": cmd_eval,
    "generate": cmd_generate,
    "push": cmd_push,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `t2r-hf` console script."""
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo_cli as handler
    elif args.command == "bench":
        from .bench import run_bench_cli as handler
    else:
        handler = COMMANDS[args.command]
    try:
        handler(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as err:
        if os.environ.get("T2R_HF_TRACEBACK"):  # developers: see where a reported error came from
            raise
        print(f"t2r-hf {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
