"""The main job and the benchmarks, on tiny budgets so they never rot."""

import csv
import json
import re

import pytest
from transformers import AutoModelForCausalLM

from t2r_hf import T2RForCausalLM
from t2r_hf.cli import main


def test_demo_end_to_end_tiny_budget_card_records_printed_figures(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--output", str(out), "--transfer-steps", "3", "--finetune-steps", "2", "--block-size", "64",
               "--eval-blocks", "1", "--max-new-tokens", "6"])
    assert rc == 0
    printed = capsys.readouterr().out
    for stage in ("[softmax]", "[swap]", "[transfer]", "[finetune]", "[sample]", "[saved]"):
        assert stage in printed
    figures = dict(re.findall(r"^  (ppl [^:]+|ratio to softmax \(final\)|transfer mean per-layer MSE): (.+)$",
                              printed, flags=re.M))
    assert {"ppl softmax (original)", "ppl T2R swap only", "ppl T2R + transfer",
            "ppl T2R + transfer + finetune"} <= set(figures)
    card = (out / "README.md").read_text()
    for key, value in figures.items():  # the card holds exactly the figures the run printed
        assert re.search(rf"\|\s*{re.escape(key)}\s*\|\s*{re.escape(value)}\s*\|", card), (key, value)
    results = json.loads((out / "results.json").read_text())
    assert float(figures["ppl softmax (original)"]) == results["ppl softmax (original)"]
    assert 1 < results["ppl softmax (original)"] < results["ppl T2R swap only"]  # the swap hurts before training
    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model, T2RForCausalLM)
    assert not (tmp_path / "demo.partial").exists()


@pytest.mark.parametrize("name", ["decode", "throughput", "train", "accuracy", "compile"])
def test_bench_quick_writes_csv_and_plot(tmp_path, capsys, name):
    extra = ["--compile-backend", "aot_eager"] if name == "compile" else []  # inductor's codegen: tested elsewhere
    rc = main(["bench", name, "--quick", "--model", "tiny", "--output", str(tmp_path), *extra])
    assert rc == 0
    with open(tmp_path / f"{name}.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and (tmp_path / f"{name}.png").stat().st_size > 1000
    if name == "decode":  # both models measured in the same run; the T2R state does not grow with context
        assert all(float(r["softmax_ms_per_token"]) > 0 and float(r["t2r_ms_per_token"]) > 0 for r in rows)
        assert len({r["t2r_cache_bytes"] for r in rows}) == 1
        # the window hybrid (W=8 in --quick) is measured beside them, its cache constant too and a ring larger
        assert all(float(r["hybrid_ms_per_token"]) > 0 for r in rows)
        assert len({r["hybrid_cache_bytes"] for r in rows}) == 1
        assert int(rows[0]["hybrid_cache_bytes"]) > int(rows[0]["t2r_cache_bytes"])
        assert int(rows[-1]["softmax_cache_bytes"]) > int(rows[0]["softmax_cache_bytes"])
    if name == "compile":  # softmax (static cache), T2R and the hybrid, each eager and compiled in the same run
        assert [r["model"] for r in rows] == ["softmax", "t2r", "hybrid"]
        assert all(float(r["eager_ms_per_token"]) > 0 and float(r["compiled_ms_per_token"]) > 0 for r in rows)
        assert float(rows[0]["vs_softmax_compiled"]) == 1.0
    if name == "accuracy":
        recipes = {r["recipe"] for r in rows}
        assert {"softmax (original)", "swap + finetune", "transfer"} <= recipes
        assert any(r.endswith("+ finetune") and r.startswith("transfer") for r in recipes)
        assert any(r.endswith("+ LoRA") for r in recipes)
        assert {"hybrid W=8: transfer", "hybrid W=8: transfer (64 tok) + finetune"} <= recipes
    assert "machine" in rows[0] and rows[0]["machine"]
