"""GPU benchmarks: T2R (fla kernels and PyTorch path) against softmax attention (SDPA, dynamic and static KV
caches), measured in the same run on the same device.

    python bench/gpu.py --output bench/results/gpu [--quick] [--models smollm2 llama1b]

Writes `gpu_decode.csv`, `gpu_train.csv`, their PNG plots and `gpu_summary.md`. Models are random-weight bf16
models of SmolLM2-135M's and of a ~1.1B Llama's architecture (speed depends on shapes, not on weight values).
Decode steps run on caches filled with random keys/values (softmax) or a random state (T2R) of the right size,
built and timed by the same helpers as `t2r-hf bench decode` (`t2r_hf.bench`). Softmax points whose KV cache exceeds `--memory-budget-gb` are recorded as
"over budget" rather than run.
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from t2r_hf import T2RForCausalLM  # noqa: E402
from t2r_hf.bench import kv_cache_bytes, softmax_cache, t2r_cache, time_decode  # noqa: E402
from t2r_hf.kernels import fla_available  # noqa: E402

ARCHS = {
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    "llama1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
}


def build(arch: str, feature_dim: int):
    torch.manual_seed(0)
    config = LlamaConfig(**ARCHS[arch], max_position_embeddings=65536, attn_implementation="sdpa")
    with torch.device("cuda"):
        softmax = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    t2r = T2RForCausalLM.from_softmax_pretrained(copy.deepcopy(softmax), feature_dim=feature_dim).cuda().eval()
    params = sum(p.numel() for p in softmax.parameters())
    return softmax, t2r, params


def bench_decode(arch, softmax, t2r, contexts, batches, steps, budget, kernels=("fla", "torch")):
    rows = []
    for length in contexts:
        for batch in batches:
            row = {"model": arch, "context": length, "batch": batch}
            kv = kv_cache_bytes(softmax.config, batch, length + steps + 8, softmax.dtype)
            row["softmax_cache_mib_per_seq"] = round(kv / batch / 2**20, 2)
            for name, static in (("sdpa_dynamic", False), ("sdpa_static", True)):
                if kv > budget:
                    row[f"{name}_tok_s"] = "over budget"
                    continue
                torch.cuda.empty_cache()
                cache = softmax_cache(softmax, batch, length, static_extra=steps + 8 if static else None)
                row[f"{name}_tok_s"] = round(batch / time_decode(softmax, cache, batch, length, steps, 3), 1)
                del cache
            for kernel in kernels:
                t2r.set_kernel(kernel)
                cache = t2r_cache(t2r, batch, length)
                row[f"t2r_{kernel}_tok_s"] = round(batch / time_decode(t2r, cache, batch, length, steps, 3), 1)
                row["t2r_state_mib_per_seq"] = round(cache.nbytes() / batch / 2**20, 3)
                del cache
            best = max(v for k, v in row.items() if k.startswith("sdpa") and isinstance(v, float)) \
                if not isinstance(row["sdpa_dynamic_tok_s"], str) else None
            best_t2r = max(row[f"t2r_{kernel}_tok_s"] for kernel in kernels)
            row["speedup_vs_best_softmax"] = round(best_t2r / best, 2) if best else "softmax over budget"
            print("decode", row, flush=True)
            rows.append(row)
    return rows


def train_step(model, length, batch=1):
    ids = torch.randint(0, model.config.vocab_size, (batch, length), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model(ids, labels=ids, use_cache=False).loss.backward()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed, torch.cuda.max_memory_allocated()


def bench_train(arch, softmax, t2r, lengths, repeats=3, kernels=("fla", "torch")):
    rows = []
    softmax.train()
    t2r.train()
    for length in lengths:
        row = {"model": arch, "length": length}
        for name, model, kernel in [("sdpa", softmax, None)] + [(f"t2r_{k}", t2r, k) for k in kernels]:
            if kernel:
                model.set_kernel(kernel)
            try:
                train_step(model, length)  # warm-up (Triton autotuning, allocator)
                times = [train_step(model, length) for _ in range(repeats)]
                row[f"{name}_tok_s"] = round(length / min(t for t, _ in times), 1)
                row[f"{name}_peak_gib"] = round(max(m for _, m in times) / 2**30, 2)
            except torch.OutOfMemoryError:
                row[f"{name}_tok_s"] = row[f"{name}_peak_gib"] = "OOM"
                model.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
        for kernel in kernels:
            if isinstance(row["sdpa_tok_s"], float) and isinstance(row[f"t2r_{kernel}_tok_s"], float):
                row[f"{kernel}_speedup_vs_sdpa"] = round(row[f"t2r_{kernel}_tok_s"] / row["sdpa_tok_s"], 2)
        print("train", row, flush=True)
        rows.append(row)
    softmax.eval()
    t2r.eval()
    return rows


def write_csv(rows, path):
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def plot(decode, train, out, machine):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num = lambda v: v if isinstance(v, float) else float("nan")  # noqa: E731
    archs = list(dict.fromkeys(r["model"] for r in decode))
    contexts = sorted({r["context"] for r in decode})
    fig, axes = plt.subplots(len(archs), len(contexts), figsize=(3.6 * len(contexts), 3.2 * len(archs)), squeeze=False)
    for i, arch in enumerate(archs):
        for j, ctx in enumerate(contexts):
            ax = axes[i][j]
            pts = [r for r in decode if r["model"] == arch and r["context"] == ctx]
            x = [r["batch"] for r in pts]
            for key in ("sdpa_dynamic_tok_s", "sdpa_static_tok_s", "t2r_fla_tok_s", "t2r_torch_tok_s"):
                ax.plot(x, [num(r.get(key)) for r in pts], marker="o", label=key.replace("_tok_s", ""))
            ax.set(xscale="log", yscale="log", title=f"{arch}, context {ctx}", xlabel="batch", ylabel="tokens/s")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
    fig.suptitle(f"decode throughput, {machine}", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "gpu_decode.png"), dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(archs), figsize=(5 * len(archs), 3.6), squeeze=False)
    for i, arch in enumerate(archs):
        pts = [r for r in train if r["model"] == arch]
        for key in ("sdpa_tok_s", "t2r_fla_tok_s", "t2r_torch_tok_s"):
            axes[0][i].plot([r["length"] for r in pts], [num(r.get(key)) for r in pts], marker="o",
                            label=key.replace("_tok_s", ""))
        axes[0][i].set(xscale="log", title=f"{arch}: forward+backward", xlabel="sequence length", ylabel="tokens/s")
        axes[0][i].grid(alpha=0.3)
        axes[0][i].legend(fontsize=7)
    fig.suptitle(machine, fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "gpu_train.png"), dpi=100)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="bench/results/gpu")
    p.add_argument("--models", nargs="+", default=["smollm2", "llama1b"], choices=list(ARCHS))
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    p.add_argument("--train-lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--feature-dim", type=int, default=32)
    p.add_argument("--memory-budget-gb", type=float, default=40.0, help="largest softmax KV cache to run")
    p.add_argument("--only", choices=["decode", "train"], help="run one of the two benchmarks")
    p.add_argument("--kernels", nargs="+", default=["fla", "torch"], choices=["fla", "torch"],
                   help="T2R paths to time (fla's kernels and/or the PyTorch path)")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs a CUDA device; on CPU use `t2r-hf bench`.")
    if "fla" in args.kernels and not fla_available():
        raise SystemExit("bench/gpu.py needs flash-linear-attention: pip install 't2r-hf[gpu]'.")
    if args.quick:
        args.models, args.contexts, args.batches, args.train_lengths, args.steps = ["smollm2"], [1024], [1, 4], [2048], 3
    os.makedirs(args.output, exist_ok=True)
    machine = f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16"
    decode, train = [], []

    def save():  # after every stage, so a run cut short still leaves its figures
        for rows in (decode, train):
            for r in rows:
                r["device"] = machine
        if decode:
            write_csv(decode, os.path.join(args.output, "gpu_decode.csv"))
        if train:
            write_csv(train, os.path.join(args.output, "gpu_train.csv"))
        if decode and train:
            plot(decode, train, args.output, machine)

    for arch in args.models:
        softmax, t2r, params = build(arch, args.feature_dim)
        print(f"== {arch}: {params / 1e6:.0f}M parameters", flush=True)
        if args.only != "train":
            decode += bench_decode(arch, softmax, t2r, args.contexts, args.batches, args.steps,
                                   args.memory_budget_gb * 2**30, args.kernels)
        save()
        if args.only != "decode":
            train += bench_train(arch, softmax, t2r, args.train_lengths, kernels=args.kernels)
            save()
        del softmax, t2r
        torch.cuda.empty_cache()
    print(f"written to {args.output} ({machine})")


if __name__ == "__main__":
    main()
