#!/usr/bin/env bash
# Install (or reuse) .venv, then start the MONAI Label server on the sample data with the default model.
# Extra arguments go to start_server, e.g.: bash scripts/serve.sh --conf num_proposals 3
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export MONAI_LABEL_SESSION_PATH=${MONAI_LABEL_SESSION_PATH:-$PWD/.sessions}
export PATH="$PWD/.venv/bin:$PATH"
exec .venv/bin/python -m monailabel.main start_server \
  --app apps/progidiff --studies "${STUDIES:-sample-datasets/ct}" \
  --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}" "$@"
