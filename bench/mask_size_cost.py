"""Benchmark: seconds per whole-model training step of the default architecture at each mask size.

The denoised mask is 64 px while slices are 128 px, which caps Dice on large organs (the reference
through the 64-px mask: `diversity_headroom.py`).  Whether a 128-px mask fits the recipe's 60-minute CPU
budget is a question of this cost.  One step = forward with the organ read-out, backward, AdamW, on a
batch of 8 random slices (the cost does not depend on the values).

    .venv/bin/python bench/mask_size_cost.py --threads 2     # → bench/results/mask_size_cost.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from progidiff.logs import configure_cli_logging
from progidiff.model import ProGiDiffConfig, ProGiDiffModel
from progidiff.pipeline import prompt_encoder_for

ROOT = Path(__file__).resolve().parents[1]


def seconds_per_step(mask_size: int, batch: int, steps: int) -> list[float]:
    torch.manual_seed(0)
    model = ProGiDiffModel.from_config(ProGiDiffConfig(mask_size=mask_size))
    text = prompt_encoder_for(model).encode(["liver"] * batch)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    image = torch.randn(batch, 1, model.config.image_size, model.config.image_size) * 300
    noisy = torch.randn(batch, 1, mask_size, mask_size)
    timesteps = torch.randint(0, 1000, (batch,))
    organ_index = torch.zeros(batch, dtype=torch.long)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        prediction, logits = model(noisy, timesteps, text, image, organ_index, return_organ_logits=True)
        loss = prediction.pow(2).mean() + logits.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(round(time.perf_counter() - start, 3))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mask-sizes", default="64,128")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6, help="timed steps; the first is reported but not averaged")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "mask_size_cost.json")
    args = parser.parse_args()
    configure_cli_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {"machine": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
               "batch": args.batch, "mask_sizes": {}}
    for size in (int(s) for s in args.mask_sizes.split(",")):
        times = seconds_per_step(size, args.batch, args.steps)
        mean = sum(times[1:]) / max(len(times) - 1, 1)
        results["mask_sizes"][str(size)] = {"seconds_per_step": round(mean, 3), "each": times}
        print(f"mask {size} px: {mean:.2f} s per whole-model step (batch {args.batch}; each {times})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
