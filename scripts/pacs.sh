#!/usr/bin/env bash
# A local PACS to use the app with DICOMweb (OHIF, DICOM-SEG): Orthanc with its DICOMweb plugin on loopback,
# loaded with a CT series made from each sample phantom. Installs the Debian packages if they are missing.
#
#   bash scripts/pacs.sh start [DIR]   # prints the DICOMweb URL; config, storage, log and PID live in DIR
#   bash scripts/pacs.sh stop [DIR]    # stops the Orthanc this script started there (by its PID)
#
# DIR defaults to .pacs; ORTHANC_HTTP_PORT (8042) and ORTHANC_DICOM_PORT (4242) choose the ports.
# Then: STUDIES=http://127.0.0.1:8042/dicom-web bash scripts/serve.sh
set -euo pipefail
cd "$(dirname "$0")/.."
command=${1:-start}
dir=$(realpath -m "${2:-.pacs}")
http_port=${ORTHANC_HTTP_PORT:-8042}
dicom_port=${ORTHANC_DICOM_PORT:-4242}
url="http://127.0.0.1:$http_port"

stop() {
  if [ -f "$dir/orthanc.pid" ]; then
    pid=$(cat "$dir/orthanc.pid")
    if kill "$pid" 2>/dev/null; then
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      echo "[pacs] stopped Orthanc (pid $pid)"
    fi
    rm -f "$dir/orthanc.pid"
  fi
}

if [ "$command" = stop ]; then stop; exit 0; fi
[ "$command" = start ] || { echo "usage: bash scripts/pacs.sh start|stop [DIR]" >&2; exit 2; }

if ! command -v Orthanc >/dev/null || [ ! -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]; then
  echo "[pacs] installing orthanc and orthanc-dicomweb (Debian packages)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends orthanc orthanc-dicomweb >/dev/null
fi
bash scripts/install.sh

stop
mkdir -p "$dir/config" "$dir/storage" "$dir/series"
cat > "$dir/config/orthanc.json" <<EOF
{
  "Name": "ProGiDiff-PACS",
  "HttpPort": $http_port, "DicomPort": $dicom_port,
  "HttpBindAddress": "127.0.0.1", "DicomBindAddress": "127.0.0.1",
  "RemoteAccessAllowed": false, "AuthenticationEnabled": false,
  "StorageDirectory": "$dir/storage", "IndexDirectory": "$dir/storage",
  "Plugins": ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"],
  "DicomWeb": {"Enable": true, "Root": "/dicom-web/"}
}
EOF
Orthanc "$dir/config" >"$dir/orthanc.log" 2>&1 &
echo $! > "$dir/orthanc.pid"
for _ in $(seq 100); do curl -sf "$url/system" >/dev/null && break; sleep 0.2; done
curl -sf "$url/system" >/dev/null || { echo "[pacs] Orthanc did not start; see $dir/orthanc.log" >&2; stop; exit 1; }

for image in sample-datasets/ct/*.nii.gz; do
  name=$(basename "$image" .nii.gz)
  if [ ! -d "$dir/series/$name" ]; then
    .venv/bin/python -m progidiff.dicom_series "$image" "$dir/series/$name" --description "$name" >/dev/null
  fi
  for slice in "$dir/series/$name"/*.dcm; do
    curl -sf -X POST "$url/instances" --data-binary "@$slice" >/dev/null
  done
done
echo "[pacs] Orthanc (pid $(cat "$dir/orthanc.pid")) holds $(curl -sf "$url/series" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))') series"
echo "$url/dicom-web"
