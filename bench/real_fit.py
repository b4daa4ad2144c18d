"""Benchmark: does a model miss an organ of the real CT because it never fitted it, or because what it fitted does not
carry to slices it did not see?  The organ read-out (ProGiDiff's scan encoder; the baseline's own logits) over the
whole of `../shared/data/ct_a_full`, scored per organ on the slices the recipe trains on and on its held-out block
(z 92-99, the benches' `ct_a` z 10-17), as scanned.  Seconds.

    .venv/bin/python bench/real_fit.py model/progidiff_ct model/baseline_ct   # → bench/results/real_fit.json

Dice of logit ≥ 0 against the reference (TotalSegmentator ids mapped by name), with the number of slices that
hold the organ on each side.  Each slice reads its real neighbours (2.5D models), as in the whole volume.
`--trace ORGAN` also says where each model puts that organ on every held-out slice (voxels, overlap with the
reference, mean voxel position), beside where the reference is: a missed organ, or one found in the wrong place?

    .venv/bin/python bench/real_fit.py model/progidiff_ct model/baseline_ct --trace pancreas
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from progidiff.baseline import BaselineSegmenter, is_baseline_folder
from progidiff.data import load_volume_pair
from progidiff.geometry import from_square, to_square
from progidiff.labels import ORGAN_IDS
from progidiff.logs import configure_cli_logging
from progidiff.metrics import dice
from progidiff.model import ProGiDiffModel
from progidiff.volume import axial_slices

from held_out import CT_A_FULL, HELD_OUT_FULL, UNSEEN_ORGANS  # bench/held_out.py, beside this script
from organ_prior import readout_logits

ROOT = Path(__file__).resolve().parents[1]
SLICE_BATCH = 16


@torch.inference_mode()
def read_out(folder: Path, image: np.ndarray, neighbours: bool = True) -> torch.Tensor:
    """Every organ's logits [Z, K, X, Y] on every slice of `image` [X, Y, Z], at the image's size.
    `neighbours` False: a 2.5D model reads each slice in its neighbours' places too (do its errors come from them?)."""
    if not is_baseline_folder(folder):
        model = ProGiDiffModel.from_pretrained(folder).eval()
        return readout_logits(model, image, neighbours=neighbours)
    baseline = BaselineSegmenter.from_pretrained(folder)
    slices, size = axial_slices(image, 0), baseline.config.image_size
    logits = torch.cat([baseline(to_square(slices[i : i + SLICE_BATCH], size))
                        for i in range(0, slices.shape[0], SLICE_BATCH)])
    return from_square(logits, image.shape[0], image.shape[1])


def fit_scores(logits: torch.Tensor, label: np.ndarray) -> dict[str, dict]:
    held_out = list(range(HELD_OUT_FULL.start, HELD_OUT_FULL.stop))
    parts = {"trained": [z for z in range(label.shape[2]) if z not in held_out], "held_out": held_out}
    scores = {}
    for organ in UNSEEN_ORGANS:
        reference = torch.from_numpy(label == ORGAN_IDS[organ]).permute(2, 0, 1)
        predicted = logits[:, ORGAN_IDS[organ] - 1] >= 0
        scores[organ] = {part: {"dice": round(dice(predicted[zs], reference[zs]), 3),
                                "slices": int(reference[zs].flatten(1).any(dim=1).sum())}
                         for part, zs in parts.items()}
    return scores


def centre(mask: np.ndarray) -> list[float] | None:
    """The mean (x, y) voxel position of a 2D mask (None: empty)."""
    where = np.argwhere(mask)
    return [round(float(c), 1) for c in where.mean(axis=0)] if len(where) else None


def slice_trace(logits: torch.Tensor, label: np.ndarray, organ: str) -> list[dict]:
    """Per held-out slice: the reference's and the read-out's voxels, their overlap and their centres."""
    reference = label == ORGAN_IDS[organ]
    predicted = (logits[:, ORGAN_IDS[organ] - 1] >= 0).permute(1, 2, 0).numpy()
    return [{"z": z, "reference_voxels": int(reference[..., z].sum()), "reference_centre": centre(reference[..., z]),
             "predicted_voxels": int(predicted[..., z].sum()), "predicted_centre": centre(predicted[..., z]),
             "overlap_voxels": int((predicted[..., z] & reference[..., z]).sum())}
            for z in range(HELD_OUT_FULL.start, HELD_OUT_FULL.stop)]


def print_trace(results: list[dict], organ: str) -> None:
    print(f"\n{organ} on the held-out slices: voxels (x, y centre); read-outs as voxels / overlap (x, y centre)")
    print("| z | reference | " + " | ".join(r["model"] for r in results) + " |")
    print("|---|---|" + "---|" * len(results))
    for rows in zip(*(r["trace"] for r in results)):  # one slice, every model
        cells = [f"{row['predicted_voxels']} / {row['overlap_voxels']} {tuple(row['predicted_centre'] or ())}"
                 for row in rows]
        print(f"| {rows[0]['z']} | {rows[0]['reference_voxels']} {tuple(rows[0]['reference_centre'] or ())} | "
              + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", type=Path, nargs="+", help="ProGiDiff or baseline model folders")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "real_fit.json")
    parser.add_argument("--trace", choices=UNSEEN_ORGANS, help="also where each model puts this organ, slice by slice")
    parser.add_argument("--no-neighbours", action="store_true",
                        help="2.5D models read each slice in place of its neighbours (out of their training, a probe)")
    args = parser.parse_args()
    configure_cli_logging()
    if not CT_A_FULL.is_dir():
        raise SystemExit(f"{CT_A_FULL} is absent: this bench needs the team's real CT beside the checkout")
    volume = load_volume_pair(CT_A_FULL / "image.nii.gz", CT_A_FULL / "label.nii.gz", "total", spacing=3.0)
    results = []
    for folder in args.models:
        logits = read_out(folder, volume.image, neighbours=not args.no_neighbours)
        results.append({"model": str(folder), "organs": fit_scores(logits, volume.label)})
        if args.trace:
            results[-1]["trace"] = slice_trace(logits, volume.label, args.trace)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python bench/real_fit.py", *sys.argv[1:]])  # as bench/levers.py records its own
    args.out.write_text(json.dumps({"command": command, "results": results}, indent=2))
    print("| model | " + " | ".join(UNSEEN_ORGANS) + " |")
    print("|---|" + "---|" * len(UNSEEN_ORGANS))
    for r in results:
        cells = [f"{s['trained']['dice']:.3f} / {s['held_out']['dice']:.3f}" for s in r["organs"].values()]
        print(f"| {r['model']} (trained / held-out slices) | " + " | ".join(cells) + " |")
    if args.trace:
        print_trace(results, args.trace)


if __name__ == "__main__":
    main()
