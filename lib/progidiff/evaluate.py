"""`python -m progidiff.evaluate`: Dice/HD95 of a model folder (ProGiDiff or baseline) against a reference.

    python -m progidiff.evaluate --model model/progidiff_ct --image ../shared/data/ct_a/image.nii.gz \\
        --label ../shared/data/ct_a/label.nii.gz --label-map total --organs liver,spleen \\
        --proposals 5 --steps 10 --seed 0 --slices 10:18 --out result.json

PATH may be a NIfTI/NRRD file or a DICOM series folder.  Scores are computed in the model's frame (RAS,
model spacing); `--slices` restricts them to a z-block (e.g. the held-out slices of a training volume); a 2.5D
model still reads the scan's own slices beside the block, as it would in the whole volume.
`--simulate-phase` first moves a non-contrast CT to a contrast phase (`progidiff.contrast`), to score a model
on enhanced anatomy where the only labelled patient was scanned without contrast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from . import contrast
from .labels import ORGAN_IDS, load_class_map, to_schema
from .logs import configure_cli_logging
from .metrics import bracketing, dice, generalized_energy_distance, hd95
from .montage import save_montage
from .predict import Predictor, load_volume
from .prompts import parse_prompt
from .proposals import MASK_THRESHOLD
from .segment import add_sampling_options
from .train import parse_ranges
from .volume import VolumeProposals

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_options(p)
    p.add_argument("--image", type=Path, required=True)
    p.add_argument("--label", type=Path, required=True)
    p.add_argument("--label-map", default="schema", help="schema, total, total_mr, or a JSON id→name file")
    p.add_argument("--organs", default="liver,spleen,kidney_left,kidney_right")
    p.add_argument("--slices", type=parse_ranges, default=None, metavar="Z0:Z1[,Z2:Z3]",
                   help="score only these z-slices")
    p.add_argument("--simulate-phase", choices=contrast.PHASES[1:], default=None,
                   help="move a non-contrast CT to this contrast phase before scoring (its labels decide where)")
    p.add_argument("--phase-seed", type=int, default=0, help="the draw of tissue values for --simulate-phase")
    p.add_argument("--out", type=Path, required=True, help="result JSON; the montage PNG goes beside it")
    return p


def _finite_or_none(value: float) -> float | None:
    """HD95 is undefined when a mask is empty; JSON has no NaN, so say null."""
    return round(value, 2) if np.isfinite(value) else None


def score_proposals(proposals: VolumeProposals, label: np.ndarray, spacing: tuple[float, ...]) -> dict[str, dict]:
    """Per organ: Dice of the consensus, of the best and the mean proposal, the consensus's HD95 (mm), whether
    the proposals bracket the reference (`progidiff.metrics.bracketing`) and their generalized energy distance
    to it, against `label` (schema values, same grid as the proposals)."""
    per_organ = {}
    for p, organ in enumerate(proposals.organs):
        reference = label == ORGAN_IDS[organ]
        probabilities = proposals.organ_probabilities(p).numpy()
        masks = probabilities >= MASK_THRESHOLD
        consensus = probabilities.mean(axis=0) >= MASK_THRESHOLD
        scores = [dice(m, reference) for m in masks]
        per_organ[organ] = {
            "dice_consensus": round(dice(consensus, reference), 4),
            "dice_best": round(max(scores), 4),
            "dice_mean": round(float(np.mean(scores)), 4),
            "hd95_consensus": _finite_or_none(hd95(consensus, reference, spacing)),
            **{f"bracketing_{k}": round(v, 4) for k, v in bracketing(masks, reference).items()},
            "ged": round(generalized_energy_distance(masks, reference), 4),
            "reference_voxels": int(reference.sum()),
        }
    return per_organ


def context_span(zs: list[int], depth: int, context_slices: int) -> range:
    """The slices to segment so that every scored slice in `zs` reads its real neighbours (2.5D input):
    the block from the first to the last scored slice, widened by `context_slices` within the volume."""
    return range(max(min(zs) - context_slices, 0), min(max(zs) + context_slices + 1, depth))


def evaluate(args: argparse.Namespace) -> dict:
    start = time.time()
    predictor = Predictor(args.model, scheduler=args.scheduler, screen_threshold=args.screen_threshold,
                          spread=args.spread)
    organs = parse_prompt(args.organs, known=tuple(predictor.organs) or tuple(ORGAN_IDS))
    loaded = load_volume(args.image, predictor.spacing_mm, label=args.label)
    image = loaded.image[0]
    label = np.asarray(loaded.data["label"][0]).astype(np.int64)
    if args.label_map != "schema":
        label = to_schema(label, load_class_map(args.label_map, args.label))
    zs = list(args.slices or range(image.shape[2]))
    span = context_span(zs, image.shape[2], predictor.context_slices)
    image, label = np.asarray(image[:, :, span], dtype=np.float32), label[:, :, span]
    if args.simulate_phase:
        if not contrast.is_unenhanced(image, label, ORGAN_IDS["aorta"]):
            raise SystemExit(f"--simulate-phase needs a non-contrast CT with a labelled aorta; {args.image} is not one")
        image = contrast.simulate_phase(image, label, ORGAN_IDS, args.simulate_phase,
                                        np.random.default_rng(args.phase_seed), loaded.voxel_spacing[0])
    proposals = predictor.segment(torch.from_numpy(image), organs, args.proposals, args.steps, args.seed)
    scored = [z - span.start for z in zs]
    image, label = image[:, :, scored], label[:, :, scored]
    proposals = dataclasses.replace(proposals, probabilities=proposals.probabilities[..., scored])
    per_organ = score_proposals(proposals, label, loaded.voxel_spacing)
    for p, organ in enumerate(organs):
        if p == 0 or organ == "liver":
            probabilities = proposals.organ_probabilities(p).numpy()
            save_montage(args.out.with_name(f"{args.out.stem}_{organ}.png"), image, probabilities,
                         probabilities.std(axis=0), label == ORGAN_IDS[organ], title=f"{args.model.name}: {organ}")
    result = {
        "model": str(args.model),
        "model_kind": predictor.kind,
        "image": str(args.image),
        "slices": zs,
        "simulated_phase": args.simulate_phase,
        "proposals": args.proposals if predictor.kind == "progidiff" else 1,
        "steps": args.steps,
        "seed": args.seed,
        "spread": proposals.spread,
        "organs": per_organ,
        "torch_threads": torch.get_num_threads(),
        "seconds": round(time.time() - start, 2),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> dict:
    configure_cli_logging()
    result = evaluate(build_parser().parse_args(argv))
    print(json.dumps(result["organs"], indent=2))
    return result


if __name__ == "__main__":
    main()
