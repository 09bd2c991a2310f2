"""Does compiling the T2R decode step pay on a GPU? Eager vs `torch.compile(model.forward)` decode ms/token.

    python bench/gpu_compile.py --output bench/results/gpu

SmolLM2-135M's shape with random weights, bf16, PyTorch path, a state standing for `--context` tokens; batch 1 and
64, all variants in the same run. Variants: eager, `torch.compile` ("default") and "reduce-overhead" (CUDA
graphs), each as the library is and with the cache's finite-state check switched off. The library checks the
state once per forward (`T2RCache.check_finite`: one host-device synchronisation per step, and one graph break
after the layers under compile); before 2026-11-23 it checked inside every layer (a synchronisation per layer and
a graph break per layer: the figures in bench/README.md from 2026-11-22 were measured then). Dynamo's recompile
limit is raised above the layer count (with a graph break in every layer, each layer's resumed frame compiles
once per `layer_idx`). A variant that fails is recorded with its error instead of a
time. Writes `gpu_compile.csv` after every row.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from t2r_hf.bench import machine_description, t2r_cache  # noqa: E402
from t2r_hf.cache import T2RStateLayer  # noqa: E402

_CHECKED_UPDATE = T2RStateLayer.update_state


def _unchecked_update(self, state, num_new_tokens):
    """`T2RStateLayer.update_state` without the finite flag, so `T2RCache.check_finite` has nothing to read (bench
    only: what the check costs)."""
    self.state_s, self.state_z = state
    self.seen_tokens += num_new_tokens
    self.is_initialized = True


def smollm2_shaped():
    from transformers import LlamaConfig, LlamaForCausalLM

    from t2r_hf import T2RForCausalLM

    torch.manual_seed(0)
    src = LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                       num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True))
    return T2RForCausalLM.from_softmax_pretrained(src, feature_dim=32).to("cuda", torch.bfloat16).eval()


@torch.no_grad()
def time_steps(step, model, batch, context, steps, warmup):
    cache = t2r_cache(model, batch, context)
    token = torch.randint(0, 49152, (batch, 1), device="cuda")
    for _ in range(warmup):
        step(token, past_key_values=cache, use_cache=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step(token, past_key_values=cache, use_cache=True)
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start) / steps


VARIANTS = [  # (name, compile mode or None for eager, finite check on)
    ("eager", None, True),
    ("eager, no finite check", None, False),
    ("compile", "default", True),
    ("compile, no finite check", "default", False),
    ("reduce-overhead, no finite check", "reduce-overhead", False),
    ("reduce-overhead", "reduce-overhead", True),
]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="bench/results/gpu")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--variants", nargs="+", choices=[v[0] for v in VARIANTS], help="run only these variants")
    args = p.parse_args()
    torch._dynamo.config.recompile_limit = 128
    torch._dynamo.config.accumulated_recompile_limit = 4096
    model = smollm2_shaped()
    model.set_kernel("torch")
    os.makedirs(args.output, exist_ok=True)
    rows = []
    for name, mode, checked in VARIANTS:
        if args.variants and name not in args.variants:
            continue
        T2RStateLayer.update_state = _CHECKED_UPDATE if checked else _unchecked_update
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        step = model.forward if mode is None else torch.compile(model.forward, mode=mode)
        for batch in args.batches:
            row = {"variant": name, "batch": batch, "context": args.context}
            try:
                start = time.perf_counter()
                row["ms_per_token"] = round(time_steps(step, model, batch, args.context, args.steps, warmup=3), 3)
                row["first_calls_s"] = round(time.perf_counter() - start, 1)
            except Exception as err:  # noqa: BLE001 - recorded, so the table says why a variant has no time
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            row["graph_breaks"] = sum(torch._dynamo.utils.counters["graph_break"].values())
            row["machine"] = machine_description()
            print(row, flush=True)
            rows.append(row)
            keys = list(dict.fromkeys(k for r in rows for k in r))
            with open(os.path.join(args.output, "gpu_compile.csv"), "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=keys)
                writer.writeheader()
                writer.writerows(rows)
    T2RStateLayer.update_state = _CHECKED_UPDATE


if __name__ == "__main__":
    main()
