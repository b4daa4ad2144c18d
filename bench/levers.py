"""Benchmark: inference-time levers for patients the model never saw, each measured against plain inference.

    .venv/bin/python bench/levers.py            # → bench/results/levers.json

Levers (the model is not retrained for any of them):
- `flip`: test-time left-right flip.  The scan is mirrored, lateral organs swap names (the left kidney of the
  mirrored scan is the right kidney of the patient), and the mirrored answer is mirrored back and averaged
  with the plain one;
- `hu_clip`: CT intensities clipped to [-200, 250] HU before the model, so an enhanced vessel (250-400 HU in
  the arterial phase) reads like the brightest soft tissue the non-contrast training CT had: an intensity
  normalisation that makes contrast phases alike;
- `z_smooth`: 3D consistency across slices without a retrained model: each proposal's probability map is averaged
  with its neighbouring slices' (weights 1/4, 1/2, 1/4 along z, the end slices repeated), so an organ that one
  slice misses and its neighbours find is filled in and a one-slice false positive fades;
- `zoom`: test-time scale, for a patient larger or smaller in the field of view than the training CT.  The model
  squares and resizes every slice to its image size, so a scale is a change of field of view: the scan padded
  with air by 1/0.9 (the anatomy drawn 0.9×) and cropped to its central 1/1.1 (drawn 1.1×; outside the crop the
  plain answer stands), each answer taken back to the scan's grid and averaged with the plain one.
Cases: the held-out block of the real CT (as scanned, and moved to the portal-venous and arterial phases by
`evaluate --simulate-phase`'s rule) and fresh portal-venous and arterial phantoms (the 12 slices around the
pancreas).  Consensus Dice per organ (N proposals, `--steps` steps: by default the served 5 and 1) and seconds.
2.5D input (neighbouring slices as channels) needs a model trained on it: the served model reads it (`context_slices`
1), so every row has it; `z_smooth` is what inference alone adds on top.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from progidiff import contrast
from progidiff.evaluate import score_proposals
from progidiff.labels import ORGAN_IDS
from progidiff.logs import configure_cli_logging
from progidiff.phantoms import make_phantom, pancreas_block
from progidiff.predict import Predictor
from progidiff.volume import DEFAULT_SCREEN_THRESHOLD, VolumeProposals

from held_out import CT_A, UNSEEN_ORGANS as ORGANS, held_out_block  # bench/held_out.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
MIRRORED = {"kidney_left": "kidney_right", "kidney_right": "kidney_left",
            "adrenal_gland_left": "adrenal_gland_right", "adrenal_gland_right": "adrenal_gland_left"}


def cases() -> list[tuple[str, np.ndarray, np.ndarray, tuple[float, ...]]]:
    found = []
    if CT_A.is_dir():
        image, label, spacing = held_out_block()
        found.append(("ct_a held-out, non-contrast", image, label, spacing))
        for phase in ("portal-venous", "arterial"):
            moved = contrast.simulate_phase(image, label, ORGAN_IDS, phase, np.random.default_rng(0))
            found.append((f"ct_a held-out, {phase} (simulated)", moved, label, spacing))
    for seed, phase in ((9102, "portal-venous"), (9103, "arterial")):
        p = make_phantom(seed, phase=phase, slice_mm=3.0)
        block = pancreas_block(p.label)
        found.append((f"phantom {seed}, {phase}, z {block.start}-{block.stop - 1}",
                      p.ct[:, :, block].astype(np.float32), p.label[:, :, block], (3.0, 3.0, 3.0)))
    return found


def segment(predictor: Predictor, image: np.ndarray, lever: str, args: argparse.Namespace) -> VolumeProposals:
    run = lambda volume, organs: predictor.segment(torch.from_numpy(np.ascontiguousarray(volume)), organs,  # noqa: E731
                                                   args.proposals, args.steps, 0)
    if lever == "hu_clip":
        return run(np.clip(image, -200, 250), ORGANS)
    plain = run(image, ORGANS)
    if lever == "none":
        return plain
    if lever == "z_smooth":
        return VolumeProposals(ORGANS, smoothed_along_z(plain.probabilities), 0, args.steps, plain.seconds, plain.spread)
    if lever == "zoom":
        return zoomed(run, image, plain, args.steps)
    mirrored = run(image[::-1], [MIRRORED.get(o, o) for o in ORGANS])
    back = mirrored.probabilities.flip(2)  # [N, P, X, Y, Z]: x mirrored back
    averaged = ((plain.probabilities.float() + back.float()) / 2).to(torch.float16)
    return VolumeProposals(ORGANS, averaged, 0, args.steps, plain.seconds + mirrored.seconds, plain.spread)


def zoomed(run: Callable[[np.ndarray, list[str]], VolumeProposals], image: np.ndarray, plain: VolumeProposals,
           steps: int) -> VolumeProposals:
    """Plain, 0.9× and 1.1× answers averaged: the field of view widened with air, then narrowed to the centre."""
    x, y = image.shape[:2]
    px, py = round(x * (1 / 0.9 - 1) / 2), round(y * (1 / 0.9 - 1) / 2)
    padded = np.pad(image, ((px, px), (py, py), (0, 0)), constant_values=float(image.min()))
    smaller = run(padded, ORGANS)
    cx, cy = round(x * (1 - 1 / 1.1) / 2), round(y * (1 - 1 / 1.1) / 2)
    larger = run(image[cx : x - cx, cy : y - cy], ORGANS)
    plain_p = plain.probabilities.float()
    wide = plain_p.clone()
    wide[:, :, cx : x - cx, cy : y - cy] = larger.probabilities.float()
    averaged = (plain_p + smaller.probabilities.float()[:, :, px : px + x, py : py + y] + wide) / 3
    seconds = plain.seconds + smaller.seconds + larger.seconds
    return VolumeProposals(ORGANS, averaged.to(torch.float16), 0, steps, seconds, plain.spread)


def smoothed_along_z(probabilities: torch.Tensor) -> torch.Tensor:
    """[N, P, X, Y, Z] probabilities averaged with the neighbouring slices (1/4, 1/2, 1/4; ends repeated)."""
    p = probabilities.float()
    before = torch.cat([p[..., :1], p[..., :-1]], dim=-1)
    after = torch.cat([p[..., 1:], p[..., -1:]], dim=-1)
    return (0.25 * before + 0.5 * p + 0.25 * after).to(probabilities.dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "model" / "progidiff_ct")
    parser.add_argument("--proposals", type=int, default=5)
    parser.add_argument("--steps", type=int, default=1, help="DDIM steps (1: the served default)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "levers.json")
    args = parser.parse_args()
    configure_cli_logging()
    predictor = Predictor(args.model, screen_threshold=DEFAULT_SCREEN_THRESHOLD)
    results = []
    for name, image, label, spacing in cases():
        for lever in ("none", "flip", "hu_clip", "z_smooth", "zoom"):
            started = time.time()
            proposals = segment(predictor, image, lever, args)
            scores = score_proposals(proposals, label, spacing)
            results.append({"case": name, "lever": lever, "seconds": round(time.time() - started, 1),
                            "dice": {o: s["dice_consensus"] for o, s in scores.items()}})
            print(name, lever, results[-1]["seconds"], json.dumps(results[-1]["dice"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python bench/levers.py", *sys.argv[1:]])
    args.out.write_text(json.dumps({"command": command, "model": str(args.model),
                                    "proposals": args.proposals, "steps": args.steps, "results": results}, indent=2))
    print("| case | lever | s | " + " | ".join(ORGANS) + " | mean |")
    print("|---|---|---|" + "---|" * (len(ORGANS) + 1))
    for r in results:
        values = [r["dice"][o] for o in ORGANS]
        print(f"| {r['case']} | {r['lever']} | {r['seconds']} | " + " | ".join(f"{v:.3f}" for v in values)
              + f" | {np.mean(values):.3f} |")


if __name__ == "__main__":
    main()
