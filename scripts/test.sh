#!/usr/bin/env bash
# Install, then run the whole test suite offline (the Hugging Face hub is never contacted).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1
python -m pytest -q "$@"
