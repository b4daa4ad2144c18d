"""Benchmark: the scan encoder's organ read-out alone (the "organ prior" the proposals vary around), per organ,
on the held-out real-CT block as scanned and moved to each contrast phase.  Seconds, not minutes: it tells
whether a training change taught the anatomy before the whole sampler is run.

    .venv/bin/python bench/organ_prior.py model/progidiff_ct [OTHER_MODEL ...]   # → bench/results/organ_prior.json

Dice of sigmoid(logit) ≥ 0.5 against the reference (`../shared/data/ct_a` slices 10-17, TotalSegmentator ids
mapped by name), and each organ's highest logit on those slices (far below 0: the read-out never fires).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from progidiff import contrast
from progidiff.geometry import from_square, to_square
from progidiff.labels import ORGAN_IDS
from progidiff.logs import configure_cli_logging
from progidiff.metrics import dice
from progidiff.model import ProGiDiffModel
from progidiff.volume import axial_slices

from held_out import CT_A, UNSEEN_ORGANS as ORGANS, held_out_block  # bench/held_out.py, beside this script

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def readout_logits(model: ProGiDiffModel, image: np.ndarray, slice_batch: int = 16,
                   neighbours: bool = True) -> torch.Tensor:
    """Every organ's read-out logits [Z, K, X, Y] on every slice of `image` [X, Y, Z] (each slice with its
    neighbours, as the model reads it; `neighbours` False: the slice itself in their places), at the image's size."""
    context = model.config.context_slices
    slices = axial_slices(image, context) if neighbours else axial_slices(image, 0).repeat(1, 1 + 2 * context, 1, 1)
    encoder, size = model.scan_encoder, model.config.image_size
    logits = torch.cat([
        F.interpolate(encoder.organ_logits(encoder.features(to_square(slices[i : i + slice_batch], size))),
                      size=size, mode="bilinear", align_corners=False)
        for i in range(0, slices.shape[0], slice_batch)])
    return from_square(logits, image.shape[0], image.shape[1])


def prior_scores(model: ProGiDiffModel, image: np.ndarray, label: np.ndarray) -> dict[str, dict]:
    logits = readout_logits(model, image)
    scores = {}
    for organ in ORGANS:
        reference = torch.from_numpy(label == ORGAN_IDS[organ]).permute(2, 0, 1)
        organ_logits = logits[:, ORGAN_IDS[organ] - 1]
        scores[organ] = {"dice": round(dice(organ_logits >= 0, reference), 3),
                         "max_logit": round(float(organ_logits.max()), 1)}
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "organ_prior.json")
    args = parser.parse_args()
    configure_cli_logging()
    if not CT_A.is_dir():
        raise SystemExit(f"{CT_A} is absent: this bench needs the team's real CT beside the checkout")
    image, label, _ = held_out_block()
    results = []
    for folder in args.models:
        model = ProGiDiffModel.from_pretrained(folder).eval()
        for phase in contrast.PHASES:
            moved = image if phase == "non-contrast" else \
                contrast.simulate_phase(image, label, ORGAN_IDS, phase, np.random.default_rng(0))
            results.append({"model": str(folder), "phase": phase, "organs": prior_scores(model, moved, label)})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": "python bench/organ_prior.py " + " ".join(map(str, args.models)),
                                    "results": results}, indent=2))
    print("| model | phase | " + " | ".join(ORGANS) + " |")
    print("|---|---|" + "---|" * len(ORGANS))
    for r in results:
        cells = [f"{r['organs'][o]['dice']:.3f} ({r['organs'][o]['max_logit']:+.0f})" for o in ORGANS]
        print(f"| {r['model']} | {r['phase']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
