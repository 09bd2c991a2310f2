#!/usr/bin/env bash
# Install, then run the main job offline: convert SmolLM2-135M, attention transfer, finetune, evaluate, sample,
# and write a hub-ready folder (default ./t2r-demo). Extra arguments go to `t2r-hf demo` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1
t2r-hf demo "$@"
