#!/usr/bin/env bash
# Install (or reuse) .venv, then run the whole test suite on the CPU, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MONAI_LABEL_TRACKING_ENABLED=false
exec .venv/bin/python -m pytest tests "$@"
