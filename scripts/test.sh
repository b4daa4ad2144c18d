#!/usr/bin/env bash
# Install (or reuse) .venv, then run the whole test suite on the CPU, offline.
# Test modules run side by side (pytest-xdist, one module per worker, so a module's server starts once), one
# torch thread each: most of a test's time is a fresh interpreter importing MONAI (~20 s of one core), and
# two workers with torch's default threads would each run on every core and stall the other at every
# operation. 2 cores: 24 -> 14 min. TEST_WORKERS=0 runs them one by one; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MONAI_LABEL_TRACKING_ENABLED=false
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest -n "${TEST_WORKERS:-auto}" --maxprocesses 4 --dist loadscope tests "$@"
