"""Benchmark: scale-out on this machine — batch inference with 1 and 2 workers, DDP training with 1 and 2 processes.

- Batch inference: `--studies` CT phantom studies (128 × 104 × 40 at 3 mm, like sample-datasets/ct) segmented for
  `--organs` with the served defaults (N = 5, 1 step), by 1 worker holding every core and by 2 worker processes
  sharing the cores (each its own model copy, studies dealt round-robin, as one per GPU would). Studies/hour.
- Training: `python -m progidiff.train` from the default model (its size and data path), `--train-steps` steps
  at global batch 8, as 1 process and as 2 DDP processes (torchrun, gloo) sharing the cores. Steps/s.
- Projection for G devices (not measured: no GPU here), each as fast as one process of this run: with DDP at a
  fixed global batch B a step costs the compute of B/G samples plus a gradient all-reduce, so
  step(G) = step(1) / G + sync, with sync = the measured 2-process step − step(1) / 2 (on a 2-core CPU that also
  holds the two processes' contention, so it overstates what NCCL between GPUs costs).  Multiply by a GPU's
  speed-up over this CPU for GPUs.  Batch inference shares studies across devices with no communication:
  G × one device's studies/hour.

    .venv/bin/python bench/scale.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from progidiff.logs import configure_cli_logging
from progidiff.phantoms import make_phantom
from progidiff.pipeline import ProGiDiffPipeline
from progidiff.prompts import parse_prompt
from progidiff.volume import segment_volume

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "model" / "progidiff_ct"


def infer_worker(args: tuple) -> float:
    """Segment the given phantom seeds; seconds spent (model loading excluded, as a running server has it)."""
    seeds, organs, threads = args
    torch.set_num_threads(threads)
    pipeline = ProGiDiffPipeline.from_pretrained(MODEL, device="cpu", show_progress=False)
    volumes = [torch.from_numpy(make_phantom(seed).ct.astype("float32")) for seed in seeds]
    started = time.perf_counter()
    for volume in volumes:
        segment_volume(pipeline, volume, organs, 5, 1, 0, screen_threshold=0.05)
    return time.perf_counter() - started


def batch_inference(workers: int, studies: int, organs: list[str], threads: int) -> dict:
    seeds = list(range(7000, 7000 + studies))
    shares = [(seeds[w::workers], organs, max(1, threads // workers)) for w in range(workers)]
    started = time.perf_counter()
    if workers == 1:
        busy = [infer_worker(shares[0])]
    else:
        with mp.get_context("spawn").Pool(workers) as pool:
            busy = pool.map(infer_worker, shares)
    wall = time.perf_counter() - started
    slowest = max(busy)  # the run lasts as long as its slowest worker (loading aside)
    return {"workers": workers, "studies": studies, "threads_per_worker": shares[0][2],
            "seconds": round(slowest, 1), "wall_seconds_with_loading": round(wall, 1),
            "studies_per_hour": round(3600 * studies / slowest, 1)}


def training(processes: int, steps: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        args = ["--out", tmp, "--init-from", str(MODEL), "--phantoms", "4", "--val-phantoms", "0",
                "--max-steps", str(steps), "--batch-size", "8", "--val-every", "0", "--checkpoint-every", "0",
                "--threads", str(max(1, threads // processes))]
        launcher = [sys.executable, "-m", "progidiff.train"] if processes == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
             "-m", "progidiff.train"]
        done = subprocess.run(launcher + args, capture_output=True, text=True, env=os.environ.copy())
        if done.returncode:
            raise RuntimeError(done.stderr[-3000:])
        record = json.loads((Path(tmp) / "train_record.json").read_text())
    seconds = record["train_seconds"]  # the steps alone: there are no validation volumes
    return {"processes": processes, "steps": steps, "global_batch": 8, "threads_per_process": max(1, threads // processes),
            "seconds_per_step": round(seconds / steps, 3), "steps_per_second": round(steps / seconds, 3)}


def projection(one: dict, two: dict, devices: tuple[int, ...] = (1, 2, 4, 8)) -> dict:
    """Steps/s on G devices as fast as one process here: step(G) = step(1) / G + sync (see the module doc)."""
    step1, step2 = one["seconds_per_step"], two["seconds_per_step"]
    sync = max(0.0, step2 - step1 / 2)
    return {str(g): round(1.0 / (step1 / g + (sync if g > 1 else 0.0)), 3) for g in devices}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=6)
    parser.add_argument("--organs", default="liver, spleen, left kidney, right kidney")
    parser.add_argument("--train-steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="cores shared by the workers")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scale.json")
    args = parser.parse_args()
    configure_cli_logging()
    organs = parse_prompt(args.organs)
    started = time.time()
    inference = [batch_inference(w, args.studies, organs, args.threads) for w in (1, 2)]
    train = [training(p, args.train_steps, args.threads) for p in (1, 2)]
    results = {"command": "python bench/scale.py " + " ".join(f"--{k.replace('_', '-')} {shlex.quote(str(v))}"
                                                               for k, v in vars(args).items() if k != "out"),
               "cpu_count": os.cpu_count(), "organs": organs, "batch_inference": inference, "training": train,
               "projected_training_steps_per_second_on_devices": projection(*train),
               "minutes": round((time.time() - started) / 60, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print("| batch inference | threads each | studies | s | studies/hour |\n|---|---|---|---|---|")
    for r in inference:
        print(f"| {r['workers']} worker(s) | {r['threads_per_worker']} | {r['studies']} | {r['seconds']} | {r['studies_per_hour']} |")
    print("\n| training (global batch 8) | threads each | s/step | steps/s |\n|---|---|---|---|")
    for r in train:
        print(f"| {r['processes']} process(es) | {r['threads_per_process']} | {r['seconds_per_step']} | {r['steps_per_second']} |")
    print("\nprojected steps/s on G devices as fast as one process here:",
          results["projected_training_steps_per_second_on_devices"])


if __name__ == "__main__":
    main()
