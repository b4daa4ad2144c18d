"""Benchmark: how much could proposals that differ gain, and does a model let its noise decide?

On the held-out real CT block (ct_a z 10-17), per organ:
- `ceiling_64px`: Dice of the reference itself, brought to the model's square as training labels are
  and taken through the model's mask size (64 px: area down, bilinear up): what the training
  representation alone costs;
- `prior` and `baseline` Dice of the scan encoder's organ read-out and of the deterministic baseline,
  each thresholded at 0.05 … 0.95: the best threshold is what a proposal that only moves the boundary
  of that estimate could reach, i.e. the headroom of boundary diversity for best-of-N;
- `noise_response`: the model's predicted mask area (pixels, 8 slices) when its input at timestep t
  is noise whose sum over the organ is −1.3 / 0 / +1.3 standard deviations (with the reference mask
  moved as `boundary_shift` ties it during training): equal areas at t = 999 mean the starting noise
  cannot decide a proposal's boundary.

    .venv/bin/python bench/diversity_headroom.py --model model/progidiff_ct --out bench/results/diversity_headroom.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from progidiff.baseline import BaselineSegmenter
from progidiff.geometry import from_square, to_square
from progidiff.labels import ORGAN_IDS
from progidiff.logs import configure_cli_logging
from progidiff.metrics import dice
from progidiff.model import ProGiDiffModel
from progidiff.pipeline import prompt_encoder_for
from progidiff.prompts import organ_text
from progidiff.text import PromptEncoder
from progidiff.training import boundary_shift, jitter_boundaries
from progidiff.volume import axial_slices
from held_out import SHARED_DATA as DATA, UNSEEN_ORGANS  # bench/held_out.py, beside this script
from run import held_out_ct  # bench/run.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95)


def to_volume(square: torch.Tensor, height: int, width: int) -> np.ndarray:
    """[Z, 1, S, S] at the model size → [X, Y, Z] on the block's grid."""
    return from_square(square.float(), height, width)[:, 0].permute(1, 2, 0).numpy()


def through_mask(model: ProGiDiffModel, square: torch.Tensor) -> torch.Tensor:
    """[Z, 1, S, S] in [0, 1] taken through the model's mask representation, as training targets are
    (`encode_mask`: area down to the mask size; `decode_mask`: bilinear back up)."""
    with torch.no_grad():
        return model.decode_mask(model.encode_mask(square))


def threshold_sweep(probability: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    return {f"{t:g}": round(dice(probability >= t, reference), 4) for t in THRESHOLDS}


@torch.no_grad()
def noise_response(model: ProGiDiffModel, text_encoder: PromptEncoder, slices: torch.Tensor, masks: torch.Tensor,
                   organ: str) -> dict:
    """Predicted mask area at t for starting noise whose sum over the organ is z = −1.3, 0, +1.3."""
    scheduler = DDPMScheduler.from_config(model.scheduler_config)
    b, size = slices.shape[0], model.working_size
    text = text_encoder.encode([organ_text(organ)]).repeat(b, 1, 1)
    organ_index = torch.full((b,), ORGAN_IDS[organ] - 1)
    region = (F.interpolate(masks, size=(size, size), mode="area") >= 0.5).float()
    count = region.sum(dim=(1, 2, 3), keepdim=True).clamp_min(1)
    base = torch.randn(b, 1, size, size, generator=torch.Generator().manual_seed(0))
    base = base - (base * region).sum(dim=(1, 2, 3), keepdim=True) / count * region  # zero sum on the organ
    out = {}
    for t in (999, 800, 600, 400):
        areas = []
        for z in (-1.3, 0.0, 1.3):
            noise = base + region * z / count.sqrt()
            target = jitter_boundaries(masks, max(model.config.boundary_jitter, 2.0), boundary_shift(noise, masks))
            timesteps = torch.full((b,), t)
            noisy = scheduler.add_noise(model.encode_mask(target), noise, timesteps)
            prediction = model(noisy, timesteps, text, slices, organ_index)
            areas.append(int((model.decode_mask(prediction) >= 0.5).sum()))
        out[str(t)] = areas
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "model" / "progidiff_ct")
    parser.add_argument("--baseline", type=Path, default=ROOT / "model" / "baseline_ct")
    parser.add_argument("--organs", default=",".join(UNSEEN_ORGANS), help="comma-separated organ names")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "diversity_headroom.json")
    args = parser.parse_args()
    configure_cli_logging()

    model = ProGiDiffModel.from_pretrained(args.model).eval()
    text_encoder = prompt_encoder_for(model)
    baseline = BaselineSegmenter.from_pretrained(args.baseline)
    image, label, _ = held_out_ct(DATA, model.config.spacing_mm)  # the block bench/run.py scores
    slices = axial_slices(image, model.config.context_slices)
    height, width = slices.shape[2:]
    square = to_square(slices, model.config.image_size)
    with torch.no_grad():
        prior_logits = model.scan_encoder.organ_logits(model.scan_encoder.features(square))
        prior_logits = F.interpolate(prior_logits, size=square.shape[-2:], mode="bilinear", align_corners=False)
        centre = model.config.context_slices  # the baseline reads the slice alone
        baseline_logits = baseline(square[:, centre : centre + 1])
    results = {"model": str(args.model), "baseline": str(args.baseline), "organs": {}}
    for organ in args.organs.split(","):
        reference = label == ORGAN_IDS[organ]
        channel = ORGAN_IDS[organ] - 1
        masks = to_square(torch.from_numpy(reference).permute(2, 0, 1)[:, None].float(), model.config.image_size,
                          mode="nearest")
        baseline_probability = baseline_logits[:, channel : channel + 1].sigmoid()
        results["organs"][organ] = {
            "reference_voxels": int(reference.sum()),
            "ceiling_64px": round(dice(to_volume(through_mask(model, masks), height, width) >= 0.5, reference), 4),
            "baseline_64px": round(dice(to_volume(through_mask(model, baseline_probability), height, width) >= 0.5,
                                        reference), 4),
            "prior": threshold_sweep(to_volume(prior_logits[:, channel : channel + 1].sigmoid(), height, width),
                                     reference),
            "baseline": threshold_sweep(to_volume(baseline_probability, height, width), reference),
            "noise_response": noise_response(model, text_encoder, square, masks, organ),
        }
        r = results["organs"][organ]
        print(f"{organ:13s} ceiling {r['ceiling_64px']:.3f}  baseline@64px {r['baseline_64px']:.3f}  "
              f"prior@0.5 {r['prior']['0.5']:.3f} best "
              f"{max(r['prior'].values()):.3f}  baseline@0.5 {r['baseline']['0.5']:.3f} best "
              f"{max(r['baseline'].values()):.3f}  area(z=-1.3/0/+1.3) t999 {r['noise_response']['999']} "
              f"t400 {r['noise_response']['400']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
