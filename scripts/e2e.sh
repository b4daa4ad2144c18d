#!/usr/bin/env bash
# End to end with the real parts: Orthanc (PACS, DICOMweb) loaded with CT series of the sample phantoms, the
# MONAI Label server on that PACS with the default model, the OHIF viewer it serves driven in headless
# Chromium: connect the MONAI Label panel, tick liver and spleen in Class Prompts, Run; the overlay must
# appear in the viewports and the PACS must hold the consensus and the proposals as DICOM-SEG.
# Installs the Debian packages it needs; stops by PID everything it started. Screenshots: $E2E_OUT (runs/e2e).
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${E2E_OUT:-runs/e2e}")
mkdir -p "$out"

if ! command -v chromium >/dev/null || ! command -v Orthanc >/dev/null \
    || [ ! -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]; then
  echo "[e2e] installing orthanc, orthanc-dicomweb and chromium (Debian packages)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends orthanc orthanc-dicomweb chromium >/dev/null
fi
bash scripts/install.sh

free_port() { .venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
work=$(mktemp -d)
server_pid=""
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null || true
  bash scripts/pacs.sh stop "$work/pacs" >/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

export ORTHANC_HTTP_PORT=$(free_port) ORTHANC_DICOM_PORT=$(free_port)
dicomweb=$(bash scripts/pacs.sh start "$work/pacs" | tail -n 1)
port=$(free_port)
echo "[e2e] PACS $dicomweb; starting the server on port $port"
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MONAI_LABEL_TRACKING_ENABLED=false \
  MONAI_LABEL_SESSION_PATH="$work/sessions" MONAI_LABEL_DICOMWEB_CACHE_PATH="$work/cache" \
  .venv/bin/python -m monailabel.main start_server --app apps/progidiff --studies "$dicomweb" \
  --host 127.0.0.1 --port "$port" --conf num_proposals 3 --conf steps 2 --conf train_dir "$work/runs" \
  >"$out/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 240); do curl -sf "http://127.0.0.1:$port/info/" >/dev/null && break; sleep 1; done
curl -sf "http://127.0.0.1:$port/info/" >/dev/null || { echo "[e2e] the server did not start; see $out/server.log" >&2; exit 1; }

.venv/bin/python scripts/e2e_ohif.py --server "http://127.0.0.1:$port" --pacs "http://127.0.0.1:$ORTHANC_HTTP_PORT" --out "$out"
echo "[e2e] passed; screenshots in $out"
