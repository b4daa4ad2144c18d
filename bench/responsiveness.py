"""Responsiveness benchmark: how long `/info` and `/datastore` take while the server samples.

A viewer polls the server while an annotator waits for proposals; MONAI Label 0.8.5 runs its endpoints on the
event loop, so before this app served the heavy endpoints from a thread pool (`lib/routes.py`) one infer
held `/info` for 15-87 s. This starts the server with the default model on a copy of the sample studies,
runs an infer (four organs, N = 5) and then an active-learning request, and asks `/info` and `/datastore`
every 0.25 s meanwhile. Prints and saves p50/p95/max per phase.

    .venv/bin/python bench/responsiveness.py --out bench/results/responsiveness.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from server import Server, copy_studies  # noqa: E402  (the tests' real-server launcher)


def poll_while(url: str, work) -> tuple[list[float], float]:
    """Latencies of `/info` and `/datastore` asked every 0.25 s while `work` runs; and how long it ran."""
    done = threading.Event()
    started = time.perf_counter()
    thread = threading.Thread(target=lambda: (work(), done.set()))
    thread.start()
    latencies = []
    while not done.is_set():
        for path in ("/info/", "/datastore/"):
            start = time.perf_counter()
            requests.get(f"{url}{path}", timeout=300).raise_for_status()
            latencies.append(time.perf_counter() - start)
        time.sleep(0.25)
    thread.join()
    return latencies, time.perf_counter() - started


def summary(latencies: list[float], seconds: float) -> dict:
    return {"work_seconds": round(seconds, 1), "requests": len(latencies),
            "p50_s": round(float(np.percentile(latencies, 50)), 3), "p95_s": round(float(np.percentile(latencies, 95)), 3),
            "max_s": round(max(latencies), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default="liver, spleen, left kidney, right kidney")
    parser.add_argument("--proposals", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "responsiveness.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        studies = copy_studies(ROOT / "sample-datasets" / "ct", work / "studies")
        conf = {"model_path": str(ROOT / "model" / "progidiff_ct"), "train_dir": str(work / "runs")}
        with Server(studies, conf, work) as server:
            def infer():
                requests.post(f"{server.url}/infer/progidiff", params={"image": "phantom_000", "output": "json"},
                              files={"params": (None, json.dumps({"prompt": args.prompt,
                                                                  "num_proposals": args.proposals}))},
                              timeout=3600).raise_for_status()

            def next_sample():
                requests.post(f"{server.url}/activelearning/proposal_disagreement", json={}, timeout=3600).raise_for_status()

            results = {"machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, 2 cores (CI class)",
                       "infer": {"prompt": args.prompt, "num_proposals": args.proposals,
                                 **summary(*poll_while(server.url, infer))},
                       "active_learning": summary(*poll_while(server.url, next_sample))}
    print(json.dumps(results, indent=2))
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    for phase in ("infer", "active_learning"):
        print(f"{phase}: /info and /datastore p95 {results[phase]['p95_s']} s over {results[phase]['requests']} "
              f"requests during {results[phase]['work_seconds']} s of work")


if __name__ == "__main__":
    main()
