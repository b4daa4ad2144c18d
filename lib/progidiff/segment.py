"""`python -m progidiff.segment`: segment a scan without a server.

    python -m progidiff.segment --model model/progidiff_ct --image scan.nii.gz --prompt "liver" \\
        --proposals 5 --seed 0 --out outdir/

Writes, in the input's geometry: `consensus.nii.gz` (label map, schema values), `proposal_<k>.nii.gz`,
`uncertainty.nii.gz` (per-voxel std over proposals, max over organs), a montage PNG per organ, and
`summary.json` (organs and label values, proposal agreement, `seconds`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from .io_utils import atomic_file
from .labels import ORGAN_IDS
from .logs import configure_cli_logging
from .montage import save_montage
from .outputs import maps_in_input_geometry, stored
from .phantoms import save_nifti
from .pipeline import DEFAULT_PROPOSALS, DEFAULT_SCHEDULER, DEFAULT_STEPS
from .predict import Predictor, load_volume
from .prompts import parse_prompt
from .volume import DEFAULT_SCREEN_THRESHOLD, organ_statistics


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    """The model and sampling options `segment`, `batch` and `evaluate` share."""
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--proposals", type=int, default=DEFAULT_PROPOSALS)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help="sampling steps (default: the server's, %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scheduler", default=DEFAULT_SCHEDULER)
    p.add_argument("--spread", type=float, default=None,
                   help="organ-prior logit range the proposals span, tightest to most generous (default: the model's)")
    p.add_argument("--screen-threshold", type=float, default=DEFAULT_SCREEN_THRESHOLD,
                   help="sample only slices where the scan encoder sees the organ (0: every slice)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_options(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--image", type=Path, required=True, help="NIfTI/NRRD file or DICOM series folder")
    p.add_argument("--out", type=Path, required=True)
    return p


def predictor_for(args: argparse.Namespace, device: str | None = None) -> Predictor:
    return Predictor(args.model, scheduler=args.scheduler, screen_threshold=args.screen_threshold,
                     spread=args.spread, device=device)


def segment_study(predictor: Predictor, args: argparse.Namespace, image_path: Path, out: Path,
                  extra: dict | None = None) -> dict:
    """Segment one study with a loaded model and write its results to `out`; `summary.json` last (atomically),
    so a folder with a summary is complete.  `extra` joins the summary."""
    start = time.time()
    organs = parse_prompt(args.prompt, known=tuple(predictor.organs) or tuple(ORGAN_IDS))
    loaded = load_volume(image_path, predictor.spacing_mm)
    proposals = predictor.segment(loaded.image[0].as_tensor(), organs, args.proposals, args.steps, args.seed)
    n = proposals.num_proposals
    maps = maps_in_input_geometry(proposals, loaded.image, loaded.transform)
    out.mkdir(parents=True, exist_ok=True)
    save_nifti(maps.consensus, maps.affine, out / "consensus.nii.gz")
    for k, proposal in enumerate(maps.proposals):
        save_nifti(proposal, maps.affine, out / f"proposal_{k}.nii.gz")
    save_nifti(stored(maps.uncertainty), maps.affine, out / "uncertainty.nii.gz")
    image = np.asarray(loaded.image[0])
    for i, organ in enumerate(organs):
        probabilities = proposals.organ_probabilities(i).numpy()
        save_montage(out / f"montage_{organ}.png", image, probabilities, probabilities.std(axis=0),
                     title=f"{args.prompt} → {organ}")
    voxel_ml = float(np.prod(loaded.voxel_spacing)) / 1000.0
    summary = {
        "image": str(image_path),
        "prompt": args.prompt,
        "organs": organs,
        "label_names": {o: ORGAN_IDS[o] for o in organs},
        "model": str(args.model),
        "proposals": n,
        "steps": args.steps,
        "seed": args.seed,
        "spread": proposals.spread,
        "organ_stats": organ_statistics(proposals, voxel_ml),
        "seconds": round(time.time() - start, 2),
        **(extra or {}),
    }
    with atomic_file(out / "summary.json", suffix=".json") as tmp:
        Path(tmp).write_text(json.dumps(summary, indent=2))
    return summary


def segment(args: argparse.Namespace) -> dict:
    return segment_study(predictor_for(args), args, args.image, args.out)


def main(argv: list[str] | None = None) -> dict:
    configure_cli_logging()
    summary = segment(build_parser().parse_args(argv))
    print(json.dumps({k: summary[k] for k in ("organs", "seconds")}))
    return summary


if __name__ == "__main__":
    main()
