"""Soak benchmark: a bounded stream of mixed valid and invalid requests against a server on loopback.

Reports requests sent, failures (an answer other than the one expected), 5xx answers (must be 0), and
p50/p95 latency for valid and invalid requests.  Bounded by `--count` and `--minutes`; loopback only.

    .venv/bin/python bench/soak.py --count 120 --workers 4 --out bench/results/soak.json

Without `--url` it starts its own server (the default model over a temporary copy of the sample data).
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from server import Server, copy_studies  # noqa: E402  (the tests' real-server launcher)


def infer(params: dict, image: str = "phantom_000"):
    return "POST", "/infer/progidiff", {"params": {"image": image, "output": "json"},
                                        "files": {"params": (None, json.dumps(params))}}


def upload(name: str, content: bytes):
    return "PUT", "/datastore/", {"params": {"image": name}, "files": {"file": (f"{name}.nii.gz", io.BytesIO(content))}}


def request_mix(rng: random.Random, i: int) -> tuple[str, int, tuple]:
    """(kind, expected status, request): about a third valid, the rest a rotation of invalid ones."""
    organ = rng.choice(["liver", "spleen", "left kidney", "aorta"])
    image = rng.choice(["phantom_000", "phantom_001", "phantom_002"])
    if i % 3 == 0:
        return "valid", 200, infer({"prompt": organ, "seed": i, "num_proposals": 2, "steps": 2}, image)
    invalid = [
        (400, infer({"prompt": "brain tumour"})),
        (400, infer({"prompt": organ, "num_proposals": 0})),
        (400, infer({"prompt": organ, "steps": "many"})),
        (400, infer({"prompt": "x" * 5000})),
        (404, infer({"prompt": organ}, "no_such_image")),
        (400, infer({"prompt": organ}, "../../etc/passwd")),
        (403, infer({"prompt": organ}, "/etc/passwd")),
        (400, upload(f"junk_{i}", b"not an image at all")),
    ]
    status, request = invalid[i % len(invalid)]
    return "invalid", status, request


def send(url: str, item: tuple[str, int, tuple]) -> dict:
    kind, expected, (method, path, kwargs) = item
    start = time.time()
    try:
        status = requests.request(method, url + path, timeout=600, **kwargs).status_code
    except requests.RequestException as error:
        status = f"{type(error).__name__}"
    return {"kind": kind, "expected": expected, "status": status, "seconds": time.time() - start}


def summary(results: list[dict]) -> dict:
    out = {"sent": len(results), "failures": sum(r["status"] != r["expected"] for r in results),
           "status_5xx": sum(isinstance(r["status"], int) and r["status"] >= 500 for r in results)}
    for kind in ("valid", "invalid"):
        seconds = [r["seconds"] for r in results if r["kind"] == kind]
        if seconds:
            out[kind] = {"sent": len(seconds), "p50_s": round(float(np.percentile(seconds, 50)), 3),
                         "p95_s": round(float(np.percentile(seconds, 95)), 3)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="", help="a running server on loopback (default: start one)")
    parser.add_argument("--count", type=int, default=120)
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak.json")
    args = parser.parse_args()
    if args.url and urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("the soak only runs against a loopback server")

    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        context = nullcontext(None)
        if not args.url:
            studies = copy_studies(ROOT / "sample-datasets" / "ct", Path(tmp) / "studies")
            context = Server(studies, {"model_path": str(ROOT / "model" / "progidiff_ct")}, Path(tmp))
        with context as server:
            url = args.url or server.url
            deadline = time.time() + args.minutes * 60
            items = [request_mix(rng, i) for i in range(args.count)]
            started = time.time()
            with ThreadPoolExecutor(max_workers=args.workers) as pool:
                futures = [pool.submit(lambda it=it: send(url, it) if time.time() < deadline else None) for it in items]
                results = [r for r in (f.result() for f in futures) if r is not None]
            alive = requests.get(url + "/info/", timeout=30).status_code == 200
    report = {**summary(results), "server_alive_after": alive, "workers": args.workers,
              "wall_seconds": round(time.time() - started, 1), "unexpected": [r for r in results if r["status"] != r["expected"]]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "unexpected"}, indent=2))


if __name__ == "__main__":
    main()
