"""Saved T2R checkpoints load anywhere: with t2r_hf, without it (remote code), and from a hub id offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import FAMILIES, random_ids, tiny_t2r
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import t2r_hf
from t2r_hf import T2RForCausalLM, T2RModel

FAMILY_IDS = sorted(FAMILIES)
REMOTE_FILES = {"configuration_t2r.py", "modeling_t2r.py", "attention.py", "cache.py", "feature_maps.py", "ops.py"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every family converted, saved, with its reference logits on fixed ids."""
    root = tmp_path_factory.mktemp("saved")
    ids = random_ids(2, 9, seed=5)
    out = {}
    for family in FAMILY_IDS:
        model = tiny_t2r(family)
        path = root / family
        model.save_pretrained(path)
        with torch.no_grad():
            out[family] = (path, model(ids).logits)
    return ids, out


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_saved_folder_contents(saved, family):
    _, out = saved
    path = out[family][0]
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "t2r" and config["source_config"]["model_type"] == family
    assert config["auto_map"] == {
        "AutoConfig": "configuration_t2r.T2RConfig",
        "AutoModel": "modeling_t2r.T2RModel",
        "AutoModelForCausalLM": "modeling_t2r.T2RForCausalLM",
    }
    assert REMOTE_FILES <= set(os.listdir(path))
    card = (path / "README.md").read_text()
    assert "- t2r" in card and "- linear-attention" in card and "trust_remote_code=True" in card
    assert f"| source family | {family} |" in card


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_reload_with_package(saved, family):
    ids, out = saved
    path, expected = out[family]
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert isinstance(model, T2RForCausalLM)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, atol=0, rtol=0)
    backbone = AutoModel.from_pretrained(path)
    assert isinstance(backbone, T2RModel)
    assert isinstance(AutoConfig.from_pretrained(path), t2r_hf.T2RConfig)


_BLOCK_T2R = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "t2r_hf" or name.startswith("t2r_hf."):
            raise ImportError("t2r_hf is deliberately unavailable in this process")
sys.meta_path.insert(0, _Block())
try:
    import t2r_hf
    raise SystemExit("t2r_hf should not import here")
except ImportError:
    pass
"""


def _run_child(code: str, env_extra: dict | None = None) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    env.pop("PYTHONPATH", None)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                            cwd=os.path.dirname(os.path.abspath(__file__)) + "/..")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def test_reload_remote_code_without_package(saved, tmp_path):
    ids, out = saved
    torch.save(ids, tmp_path / "ids.pt")
    code = _BLOCK_T2R + textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForCausalLM
        ids = torch.load({str(tmp_path / "ids.pt")!r})
        for family in {FAMILY_IDS!r}:
            path = {str(out[FAMILY_IDS[0]][0].parent)!r} + "/" + family
            model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
            assert type(model).__name__ == "T2RForCausalLM" and "t2r_hf" not in type(model).__module__
            with torch.no_grad():
                torch.save(model(ids).logits, {str(tmp_path)!r} + "/" + family + ".pt")
    """)
    _run_child(code, {"HF_MODULES_CACHE": str(tmp_path / "modules")})
    for family in FAMILY_IDS:
        torch.testing.assert_close(torch.load(tmp_path / f"{family}.pt"), out[family][1], atol=0, rtol=0)


def _hub_snapshot(hf_home, repo_id: str, folder) -> None:
    """Lay `folder` out as the offline HF cache entry of `repo_id` (refs/main -> snapshots/<sha>/)."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snap = repo_dir / "snapshots" / sha
    snap.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(sha)
    for name in os.listdir(folder):
        (snap / name).write_bytes((folder / name).read_bytes())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_reload_from_hub_id_offline(saved, tmp_path, family):
    ids, out = saved
    path, expected = out[family]
    hf_home = tmp_path / "hf"
    _hub_snapshot(hf_home, f"t2r-test/tiny-{family}", path)
    torch.save(ids, tmp_path / "ids.pt")
    load = textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForCausalLM
        ids = torch.load({str(tmp_path / "ids.pt")!r})
        model = AutoModelForCausalLM.from_pretrained("t2r-test/tiny-{family}", **KWARGS).eval()
        with torch.no_grad():
            torch.save(model(ids).logits, {str(tmp_path)!r} + "/" + NAME + ".pt")
    """)
    env = {"HF_HOME": str(hf_home), "HF_MODULES_CACHE": str(tmp_path / "modules")}
    _run_child("import t2r_hf\nKWARGS = {}\nNAME = 'installed'\n" + load, env)
    _run_child(_BLOCK_T2R + "KWARGS = {'trust_remote_code': True}\nNAME = 'remote'\n" + load, env)
    for name in ("installed", "remote"):
        torch.testing.assert_close(torch.load(tmp_path / f"{name}.pt"), expected, atol=0, rtol=0)


def test_missing_feature_map_weights_is_an_error(saved, tmp_path):
    _, out = saved
    path = out["llama"][0]
    for name in os.listdir(path):
        (tmp_path / name).write_bytes((path / name).read_bytes())
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "feature_map" not in k}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"T2R parameters .*feature_map"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_softmax_checkpoint_under_t2r_config_is_an_error(tmp_path):
    """A plain source checkpoint relabelled as T2R has no feature maps: refused, not randomly initialised."""
    from helpers import tiny_source

    source = tiny_source("llama")
    source.save_pretrained(tmp_path)
    config = t2r_hf.T2RConfig(source_config=source.config.to_dict(), feature_dim=8)
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="from_softmax_pretrained"):
        T2RForCausalLM.from_pretrained(tmp_path)


def test_save_reload_bf16_keeps_dtype(tmp_path):
    model = tiny_t2r("qwen3").to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    for (name, a), (_, b) in zip(model.named_parameters(), loaded.named_parameters()):
        assert torch.equal(a, b), name
    # `.to(bf16)` also casts the rotary buffers, which `from_pretrained` keeps in fp32 (as for any HF model)
    ids = random_ids(1, 6)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits.float(), model(ids).logits.float(), atol=5e-2, rtol=0)
