"""Benchmarks of a T2R model against its softmax original, measured side by side in the same run.

    t2r-hf bench decode      ms/token and cache bytes per sequence vs context length (batch 1), with the
                             sliding-window hybrid (`--window-size`, default 64) beside pure T2R
    t2r-hf bench throughput  batched decode tokens/s vs batch size at a long context, under a memory budget
    t2r-hf bench train       forward+backward tokens/s vs sequence length (chunked T2R vs softmax SDPA)
    t2r-hf bench accuracy    held-out perplexity vs training tokens (swap, transfer, transfer+finetune, LoRA,
                             and transfer / transfer+finetune of the window hybrid)
    t2r-hf bench compile     decode ms/token eager vs `torch.compile` (mode "default"), softmax (static cache),
                             T2R and the hybrid, at `--throughput-context`
    t2r-hf bench all         the five above (compile alone takes minutes: it compiles three models)

Each writes `<name>.csv` and `<name>.png` under `--output`. Decode benchmarks time steps on caches filled with
random keys/values (softmax) or a random state (T2R) of the right size: a decode step's cost depends on the
cache's shape, not its values, and this avoids minutes of prefill per point on a CPU.
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import platform
import time

import torch
from transformers import DynamicCache
from transformers.utils import logging

logger = logging.get_logger(__name__)

BENCHMARKS = ("decode", "throughput", "train", "accuracy", "compile")


def add_bench_args(p: argparse.ArgumentParser) -> None:
    """Arguments of `t2r-hf bench`."""
    p.add_argument("name", choices=[*BENCHMARKS, "all"], help="which benchmark to run")
    p.add_argument("--output", default="bench/results", help="folder for the CSV and PNG files")
    p.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"],
                   help="smollm2: the real SmolLM2-135M; tiny: a random 2-layer Llama (for --quick checks)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the scripts run, in seconds")
    p.add_argument("--feature-dim", type=int, default=32)
    p.add_argument("--window-size", type=int, default=64,
                   help="window of the hybrid model compared in decode and accuracy (0: leave it out)")
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--decode-steps", type=int, default=16, help="timed decode steps per point")
    p.add_argument("--throughput-context", type=int, default=4096)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128])
    p.add_argument("--memory-budget-gb", type=float, default=4.0, help="cache memory allowed in the throughput run")
    p.add_argument("--train-lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    p.add_argument("--budgets", type=int, nargs="+", default=[0, 8, 24, 48],
                   help="accuracy: training steps (one --block-size block each) at which to evaluate")
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--eval-blocks", type=int, default=4)
    p.add_argument("--compile-backend", default="inductor", help="compile: torch.compile backend")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")


def machine_description() -> str:
    """One line naming the machine the figures come from."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA), torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}"


def load_pair(name: str, feature_dim: int = 32):
    """`(softmax_model, t2r_model, tokenizer)`: two independent copies (conversion adopts its source)."""
    from .modeling_t2r import T2RForCausalLM

    if name == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        softmax = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
        tokenizer = None
    else:
        from .assets import load_smollm2

        softmax, tokenizer = load_smollm2()
    softmax.eval()
    torch.manual_seed(0)
    t2r = T2RForCausalLM.from_softmax_pretrained(copy.deepcopy(softmax), feature_dim=feature_dim).eval()
    return softmax, t2r, tokenizer


def make_hybrid(softmax, feature_dim: int, window_size: int):
    """A sliding-window hybrid T2R copy of `softmax` (same seed for its feature maps as `load_pair`'s model)."""
    from .modeling_t2r import T2RForCausalLM

    torch.manual_seed(0)
    return T2RForCausalLM.from_softmax_pretrained(copy.deepcopy(softmax), feature_dim=feature_dim,
                                                  window_size=window_size).eval()


def _kv_geometry(config):
    from .attention import head_geometry

    _, num_kv, head_dim = head_geometry(config)
    return config.num_hidden_layers, num_kv, head_dim


def kv_cache_bytes(config, batch: int, length: int, dtype: torch.dtype) -> int:
    """Bytes of a softmax KV cache of `length` positions for `batch` sequences."""
    layers, num_kv, head_dim = _kv_geometry(config)
    return 2 * layers * batch * num_kv * length * head_dim * dtype.itemsize


def softmax_cache(model, batch: int, length: int, static_extra: int | None = None) -> DynamicCache:
    """A softmax KV cache holding `length` random positions per layer, on the model's device.

    `static_extra`: build a `StaticCache` with room for that many more positions instead of a `DynamicCache`."""
    from transformers import StaticCache

    layers, num_kv, head_dim = _kv_geometry(model.config)
    if static_extra is None:
        cache = DynamicCache(config=model.config)
    else:
        cache = StaticCache(config=model.config, max_cache_len=length + static_extra)
    for i in range(layers):
        k = torch.randn(batch, num_kv, length, head_dim, dtype=model.dtype, device=model.device)
        cache.update(k, torch.randn_like(k), i)
    return cache


def t2r_cache(model, batch: int, length: int):
    """A T2R cache whose state stands for `length` random positions (same shapes as after a real prefill; with a
    sliding window, a full ring of random keys/values too)."""
    from .cache import T2RCache

    layers, num_kv, head_dim = _kv_geometry(model.source_model.config)
    probe = torch.zeros(1, num_kv, 1, head_dim, dtype=model.dtype, device=model.device)
    feat = model._feature_map_owners[0].feature_map(probe).shape[-1]
    cache = T2RCache(model.config)
    for layer in cache.layers:
        s = torch.rand(batch, num_kv, feat, head_dim, device=model.device) * length
        z = torch.rand(batch, num_kv, feat, device=model.device) * length
        layer.update_state((s, z), length)
        window = model.config.window_size
        if window:
            keys = torch.randn(batch, num_kv, window, head_dim, dtype=model.dtype, device=model.device)
            valid = torch.ones(batch, window, dtype=torch.bool, device=model.device)
            layer.update_ring((keys, torch.randn_like(keys), valid))
    return cache


def cache_bytes(cache) -> int:
    """Bytes held by a softmax DynamicCache or a T2RCache."""
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.keys is not None)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_decode(model, cache, batch: int, length: int, steps: int, warmup: int = 2, step=None) -> float:
    """Mean seconds per decode step (batch `batch`) continuing after `length` cached positions (any device).

    `step`: what to call instead of `model` (e.g. a compiled `model.forward`)."""
    step = step or model
    device = model.device
    ids = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)
    positions = lambda i: torch.full((batch, 1), length + i, device=device)  # noqa: E731
    for i in range(warmup):
        step(ids, past_key_values=cache, position_ids=positions(i), use_cache=True)
    _synchronize(device)
    start = time.perf_counter()
    for i in range(steps):
        step(ids, past_key_values=cache, position_ids=positions(warmup + i), use_cache=True)
    _synchronize(device)
    return (time.perf_counter() - start) / steps


def bench_decode(softmax, t2r, contexts, steps: int, hybrid=None) -> list[dict]:
    """Batch-1 decode ms/token and cache bytes per sequence at each context length (and the hybrid's, if given)."""
    rows = []
    models = [("softmax", softmax, softmax_cache), ("t2r", t2r, t2r_cache)]
    if hybrid is not None:
        models.append(("hybrid", hybrid, t2r_cache))
    for length in contexts:
        row = {"context": length}
        for name, model, make in models:
            cache = make(model, 1, length)
            row[f"{name}_cache_bytes"] = cache_bytes(cache)
            row[f"{name}_ms_per_token"] = round(1000 * time_decode(model, cache, 1, length, steps), 3)
            del cache
        row["speedup"] = round(row["softmax_ms_per_token"] / row["t2r_ms_per_token"], 3)
        row["state_vs_kv_percent"] = round(100 * row["t2r_cache_bytes"] / row["softmax_cache_bytes"], 4)
        logger.info("decode %s", row)
        rows.append(row)
    return rows


def bench_throughput(softmax, t2r, context: int, batch_sizes, steps: int, budget_bytes: float) -> list[dict]:
    """Decode tokens/s per batch size at `context`; softmax stops where its KV cache exceeds the budget."""
    rows = []
    kv_per_seq = kv_cache_bytes(softmax.config, 1, context + steps + 2, softmax.dtype)
    for batch in batch_sizes:
        row = {"batch": batch, "context": context}
        if batch * kv_per_seq <= budget_bytes:
            cache = softmax_cache(softmax, batch, context)
            row["softmax_tokens_per_s"] = round(batch / time_decode(softmax, cache, batch, context, steps), 2)
            del cache
        else:
            row["softmax_tokens_per_s"] = "over budget"
        cache = t2r_cache(t2r, batch, context)
        row["t2r_tokens_per_s"] = round(batch / time_decode(t2r, cache, batch, context, steps), 2)
        row["softmax_cache_bytes"] = batch * kv_per_seq
        row["t2r_cache_bytes"] = cache_bytes(cache)
        logger.info("throughput %s", row)
        rows.append(row)
    return rows


def bench_compile(softmax, t2r, context: int, steps: int, backend: str = "inductor", hybrid=None) -> list[dict]:
    """Batch-1 decode ms/token at `context`, eager vs `torch.compile(model.forward, mode="default")`, per model.

    Softmax decodes from a `StaticCache` (the cache transformers compiles with); T2R from its own cache, which
    `generate(..., compile_config=CompileConfig(mode="default"))` compiles the same way. `first_call_s` is the
    first compiled step (tracing and code generation)."""
    models = [("softmax", softmax, lambda m, b, n: softmax_cache(m, b, n, static_extra=steps + 8)),
              ("t2r", t2r, t2r_cache)]
    if hybrid is not None:
        models.append(("hybrid", hybrid, t2r_cache))
    rows = []
    for name, model, make in models:
        row = {"model": name, "context": context, "backend": backend}
        row["eager_ms_per_token"] = round(1000 * time_decode(model, make(model, 1, context), 1, context, steps), 3)
        torch._dynamo.reset()
        compiled = torch.compile(model.forward, mode="default", backend=backend)
        cache = make(model, 1, context)
        start = time.perf_counter()
        time_decode(model, cache, 1, context, 1, warmup=0, step=compiled)
        row["first_call_s"] = round(time.perf_counter() - start, 1)
        timed = time_decode(model, cache, 1, context + 1, steps, step=compiled)  # continues after the first step
        row["compiled_ms_per_token"] = round(1000 * timed, 3)
        row["compile_speedup"] = round(row["eager_ms_per_token"] / row["compiled_ms_per_token"], 3)
        logger.info("compile %s", row)
        rows.append(row)
    for row in rows:
        row["vs_softmax_compiled"] = round(rows[0]["compiled_ms_per_token"] / row["compiled_ms_per_token"], 3)
    return rows


def time_train_step(model, length: int) -> float:
    """Seconds for one forward+backward of a (1, length) random sequence with labels."""
    ids = torch.randint(0, model.config.vocab_size, (1, length))
    model.train()
    start = time.perf_counter()
    loss = model(ids, labels=ids, use_cache=False).loss
    loss.backward()
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    model.eval()
    return elapsed


def bench_train(softmax, t2r, lengths) -> list[dict]:
    """Forward+backward tokens/s at each sequence length (one warm-up step at the smallest length)."""
    time_train_step(softmax, lengths[0])
    time_train_step(t2r, lengths[0])
    rows = []
    for length in lengths:
        row = {"length": length, "softmax_attn": softmax.config._attn_implementation}
        row["softmax_tokens_per_s"] = round(length / time_train_step(softmax, length), 1)
        row["t2r_tokens_per_s"] = round(length / time_train_step(t2r, length), 1)
        row["speedup"] = round(row["t2r_tokens_per_s"] / row["softmax_tokens_per_s"], 3)
        logger.info("train %s", row)
        rows.append(row)
    return rows


def _lm_steps(model, blocks, steps: int, lr: float, params, offset: int = 0):
    """Plain AdamW next-token training of `params` for `steps` blocks."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        batch = blocks[(offset + step) % len(blocks)][None]
        model(batch, labels=batch, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()


def bench_accuracy(softmax, t2r, tokenizer, budgets, block_size: int, eval_blocks: int, hybrid=None) -> list[dict]:
    """Held-out perplexity vs training tokens for each recipe, with the softmax original as reference; with
    `hybrid`, its transfer and transfer+finetune curves at the same budgets."""
    from .data import corpus_path
    from .evaluation import perplexity, tokenize_blocks
    from .finetune import apply_lora
    from .transfer import attention_transfer

    if tokenizer is None:  # tiny model: random token ids stand in for text
        gen = torch.Generator().manual_seed(0)
        heldout = torch.randint(0, softmax.config.vocab_size, (eval_blocks, block_size), generator=gen)
        train = torch.randint(0, softmax.config.vocab_size, (64, block_size), generator=gen)
    else:
        heldout = tokenize_blocks(tokenizer, open(corpus_path("heldout"), encoding="utf-8").read(), block_size,
                                  eval_blocks)
        train = tokenize_blocks(tokenizer, open(corpus_path("train"), encoding="utf-8").read(), block_size)
    reference = perplexity(softmax, heldout)
    budgets = sorted(set(budgets))
    rows = [{"recipe": "softmax (original)", "train_tokens": 0, "ppl": round(reference, 3)}]
    initial = copy.deepcopy(t2r.state_dict())

    def curve(recipe: str, prepare, step_fn, base=t2r, start=initial):
        base.load_state_dict(start)
        model = prepare()
        done = 0
        for budget in budgets:
            step_fn(model, budget - done, done)
            done = budget
            rows.append({"recipe": recipe, "train_tokens": budget * block_size,
                         "ppl": round(perplexity(model, heldout), 3)})
            logger.info("accuracy %s", rows[-1])

    full = lambda m, n, off: _lm_steps(m, train, n, 1e-4, list(m.parameters()), off)  # noqa: E731
    curve("swap + finetune", lambda: t2r, full)
    curve("transfer", lambda: t2r,
          lambda m, n, off: n and attention_transfer(m, train[off:], max_steps=n, progress=False))
    transfer_steps = budgets[-1]

    def transferred():
        if transfer_steps:
            attention_transfer(t2r, train, max_steps=transfer_steps, progress=False)
        return t2r

    curve(f"transfer ({transfer_steps * block_size} tok) + finetune", transferred,
          lambda m, n, off: _lm_steps(m, train, n, 1e-4, list(m.parameters()), transfer_steps + off))

    def lora_model():  # PEFT injects adapters in place: keep `t2r` itself clean for later reuse
        return apply_lora(copy.deepcopy(transferred()))

    curve(f"transfer ({transfer_steps * block_size} tok) + LoRA", lora_model,
          lambda m, n, off: _lm_steps(m, train, n, 1e-3, [p for p in m.parameters() if p.requires_grad],
                                      transfer_steps + off))
    t2r.load_state_dict(initial)
    if hybrid is not None:
        window = hybrid.config.window_size
        hybrid_initial = copy.deepcopy(hybrid.state_dict())
        curve(f"hybrid W={window}: transfer", lambda: hybrid,
              lambda m, n, off: n and attention_transfer(m, train[off:], max_steps=n, progress=False),
              base=hybrid, start=hybrid_initial)

        def hybrid_transferred():
            if transfer_steps:
                attention_transfer(hybrid, train, max_steps=transfer_steps, progress=False)
            return hybrid

        curve(f"hybrid W={window}: transfer ({transfer_steps * block_size} tok) + finetune", hybrid_transferred,
              lambda m, n, off: _lm_steps(m, train, n, 1e-4, list(m.parameters()), transfer_steps + off),
              base=hybrid, start=hybrid_initial)
        hybrid.load_state_dict(hybrid_initial)
    return rows


def write_csv(rows: list[dict], path: str) -> None:
    """Write rows (dicts with the same keys) as CSV."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def plot(name: str, rows: list[dict], path: str, machine: str) -> None:
    """A PNG plot of one benchmark's rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if name == "decode" else 1, figsize=(11 if name == "decode" else 6, 4))
    axes = list(axes) if name == "decode" else [axes]
    num = lambda v: v if isinstance(v, (int, float)) else float("nan")  # noqa: E731
    if name == "decode":
        x = [r["context"] for r in rows]
        for label in ("softmax", "t2r", "hybrid"):
            if f"{label}_ms_per_token" not in rows[0]:
                continue
            axes[0].plot(x, [r[f"{label}_ms_per_token"] for r in rows], marker="o", label=label)
            axes[1].plot(x, [r[f"{label}_cache_bytes"] / 2**20 for r in rows], marker="o", label=label)
        axes[0].set(xlabel="context (tokens)", ylabel="ms / token", xscale="log", title="decode latency, batch 1")
        axes[1].set(xlabel="context (tokens)", ylabel="cache MiB / sequence", xscale="log", yscale="log",
                    title="cache memory")
    elif name == "throughput":
        x = [r["batch"] for r in rows]
        for label in ("softmax", "t2r"):
            axes[0].plot(x, [num(r[f"{label}_tokens_per_s"]) for r in rows], marker="o", label=label)
        axes[0].set(xlabel="batch size", ylabel="tokens / s", xscale="log", yscale="log",
                    title=f"decode throughput at context {rows[0]['context']}")
    elif name == "compile":
        x = range(len(rows))
        width = 0.4
        axes[0].bar([i - width / 2 for i in x], [r["eager_ms_per_token"] for r in rows], width, label="eager")
        axes[0].bar([i + width / 2 for i in x], [r["compiled_ms_per_token"] for r in rows], width, label="compiled")
        axes[0].set_xticks(list(x), [r["model"] for r in rows])
        axes[0].set(ylabel="ms / token", title=f"decode, batch 1, context {rows[0]['context']}")
    elif name == "train":
        x = [r["length"] for r in rows]
        for label in ("softmax", "t2r"):
            axes[0].plot(x, [r[f"{label}_tokens_per_s"] for r in rows], marker="o", label=label)
        axes[0].set(xlabel="sequence length", ylabel="tokens / s (fwd+bwd)", xscale="log",
                    title="training throughput")
    else:
        for recipe in dict.fromkeys(r["recipe"] for r in rows):
            pts = [r for r in rows if r["recipe"] == recipe]
            if recipe.startswith("softmax"):
                axes[0].axhline(pts[0]["ppl"], color="black", linestyle="--", label=recipe)
            else:
                axes[0].plot([p["train_tokens"] for p in pts], [p["ppl"] for p in pts], marker="o", label=recipe)
        axes[0].set(xlabel="training tokens", ylabel="held-out perplexity", yscale="log", title="accuracy retention")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(machine, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_benchmarks(names, output: str, model: str = "smollm2", quick: bool = False, **options) -> dict:
    """Run benchmarks `names` and write `<name>.csv` / `<name>.png` into `output`; returns the rows per name."""
    if options.get("threads"):
        torch.set_num_threads(options["threads"])
    if quick:
        options.update(contexts=[32, 64, 128], decode_steps=2, throughput_context=64, batch_sizes=[1, 2, 4],
                       memory_budget_gb=2 * 2 * 2 * 66 * 16 * 4 * 2 / 2**30, train_lengths=[32, 64],
                       budgets=[0, 1, 2], block_size=32, eval_blocks=1)
    os.makedirs(output, exist_ok=True)
    softmax, t2r, tokenizer = load_pair(model, options.get("feature_dim", 32))
    window = options.get("window_size", 64)
    if quick and window:
        window = min(window, 8)
    hybrid = make_hybrid(softmax, options.get("feature_dim", 32), window) if window else None
    machine = machine_description()
    results = {}
    for name in names:
        if name == "decode":
            rows = bench_decode(softmax, t2r, options["contexts"], options["decode_steps"], hybrid)
        elif name == "throughput":
            rows = bench_throughput(softmax, t2r, options["throughput_context"], options["batch_sizes"],
                                    options["decode_steps"], options["memory_budget_gb"] * 2**30)
        elif name == "train":
            rows = bench_train(softmax, t2r, options["train_lengths"])
        elif name == "compile":
            rows = bench_compile(softmax, t2r, options["throughput_context"], options["decode_steps"],
                                 options.get("compile_backend", "inductor"), hybrid)
        else:
            rows = bench_accuracy(softmax, t2r, tokenizer, options["budgets"], options["block_size"],
                                  options["eval_blocks"], hybrid)
        for row in rows:
            row["machine"] = machine
        write_csv(rows, os.path.join(output, f"{name}.csv"))
        plot(name, rows, os.path.join(output, f"{name}.png"), machine)
        results[name] = rows
    return results


def run_bench_cli(args) -> None:
    """`t2r-hf bench`: run, then print each benchmark's rows."""
    names = BENCHMARKS if args.name == "all" else (args.name,)
    options = {k: v for k, v in vars(args).items() if k not in ("name", "output", "model", "quick", "command")}
    results = run_benchmarks(names, args.output, model=args.model, quick=args.quick, **options)
    for name, rows in results.items():
        print(f"== {name} ({rows[0]['machine']}) -> {args.output}/{name}.csv, .png")
        for row in rows:
            print("  " + ", ".join(f"{k}={v}" for k, v in row.items() if k != "machine"))
