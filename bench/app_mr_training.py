"""Benchmark: the app's MR LoRA train task (`POST /train/progidiff_mr_lora`) on one labelled MR study, with and
without the MR phantoms it mixes in by default (`phantoms` 8 at a fifth of the samples, as the shipped adapter's
recipe).

What an annotator does: one labelled MR study in the datastore (`../shared/data/mr_a`, TotalSegmentator ids),
train with the task's defaults (300 epochs, learning rate 1e-3, batch 8; the task holds out the study's top
block of slices for its own validation).  Each run goes through `ProGiDiffLoraTrain.train` as MONAI Label calls
it, from the shipped CT model.  Scores, per organ, of the run's best adapter (its candidate):
- the task's own validation on the held-out top block of the same study (what `train_stats` shows);
- fresh MR phantoms (seeds 6100…, never trained on): other bodies, every abdominal level;
- organ volumes (ml) on the sample MR study `sample-datasets/mr/phantom_001_mr` (the study a new user opens)
  against the plausibility ranges the infer task warns by.
N = 5, 1 step, seed 0 (the served defaults).  JSON beside a Markdown table.

    .venv/bin/python bench/app_mr_training.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Compose

from progidiff.data import phantom_volumes
from progidiff.intensity import PercentileNormalisation
from progidiff.logs import configure_cli_logging
from progidiff.model import ProGiDiffModel
from progidiff.pipeline import ProGiDiffPipeline
from progidiff.plausibility import ADULT_VOLUME_ML
from progidiff.volume import loading_transforms, organ_statistics, segment_volume

# bench/, beside this script
from held_out import MR_A
from mr_adaptation import ORGANS, score, with_adapter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "apps" / "progidiff"))
from lib.configs.progidiff import AppSettings  # noqa: E402  (the app's packages, as MONAI Label loads them)
from lib.trainers.progidiff_lora import ProGiDiffLoraTrain  # noqa: E402

SAMPLE_STUDY = ROOT / "sample-datasets" / "mr" / "phantom_001_mr.nii.gz"
logger = logging.getLogger("bench.app_mr_training")


def train(phantoms: int, work: Path, args: argparse.Namespace) -> tuple[dict, Path, float]:
    """One run of the app's task; (its train stats, its candidate adapter, minutes)."""
    task = ProGiDiffLoraTrain(args.model, work / "adapters", work / "runs",
                              AppSettings.from_conf({"device": "cpu"}, args.model))
    request = {**task._config, "name": f"phantoms_{phantoms}", "run_id": "bench", "device": "cpu",
               "phantoms": phantoms, **({"max_epochs": args.max_epochs} if args.max_epochs else {})}
    datalist = [{"image": str(MR_A / "image.nii.gz"), "label": str(MR_A / "label.nii.gz"), "class_map": "total_mr",
                 "id": "mr_a"}]
    torch.manual_seed(0)
    started = time.time()
    stats = task.train(0, 1, request, datalist)
    return stats, Path(stats["candidate"]), (time.time() - started) / 60


def sample_study_volumes(model: ProGiDiffModel, normalisation: PercentileNormalisation | None,
                         args: argparse.Namespace) -> dict:
    """Consensus volume (ml) of each organ on the sample MR study, read as the infer task reads it."""
    loaded = Compose(loading_transforms("image", model.config.spacing_mm))({"image": str(SAMPLE_STUDY)})["image"]
    image = np.asarray(loaded[0], dtype=np.float32)
    if normalisation is not None:
        image = normalisation(image)
    pipeline = ProGiDiffPipeline.from_model(model, device="cpu", show_progress=False)
    proposals = segment_volume(pipeline, torch.from_numpy(image), ORGANS, args.proposals, args.sampling_steps,
                               args.seed)
    voxel_ml = float(np.prod([float(v) for v in loaded.pixdim[:3]])) / 1000.0
    return {organ: stats["consensus_volume_ml"] for organ, stats in organ_statistics(proposals, voxel_ml).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "model" / "progidiff_ct")
    parser.add_argument("--runs", default="0,8", help="values of the task's `phantoms` option to compare")
    parser.add_argument("--max-epochs", type=int, default=0, help="the task's `max_epochs` (0: its default, 300)")
    parser.add_argument("--phantoms", type=int, default=2, help="fresh MR phantoms scored (seeds 6100…)")
    parser.add_argument("--proposals", type=int, default=5)
    parser.add_argument("--sampling-steps", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "app_mr_training.json")
    args = parser.parse_args()
    configure_cli_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not MR_A.is_dir():
        raise SystemExit(f"{MR_A} is absent: the bench trains on the real MR")
    fresh = [[v] for v in phantom_volumes(args.phantoms, 6100, "mr")]
    results = {"command": "python bench/app_mr_training.py " + " ".join(sys.argv[1:]), "model": str(args.model),
               "torch_threads": torch.get_num_threads(), "plausible_ml": {o: ADULT_VOLUME_ML[o] for o in ORGANS},
               "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for phantoms in (int(n) for n in args.runs.split(",")):
            stats, candidate, minutes = train(phantoms, Path(tmp) / f"phantoms_{phantoms}", args)
            model, normalisation, _ = with_adapter(args.model, candidate)
            results["runs"][f"phantoms {phantoms}"] = {
                "minutes": round(minutes, 1), "steps": stats["history"][-1]["step"],
                "best_epoch": stats["eval"]["best_metric_epoch"],
                "own_validation": {o: round(stats["eval"]["metrics"][f"val_dice_{o}"], 4)
                                   if f"val_dice_{o}" in stats["eval"]["metrics"] else None  # not in the block
                                   for o in ORGANS},
                "best_own_validation": round(stats["best_metric"], 4),
                "fresh_mr_phantoms": score(model, fresh, normalisation, args),
                "sample_study_ml": sample_study_volumes(model, normalisation, args),
            }
            logger.info("phantoms %d: %s", phantoms, json.dumps(results["runs"][f"phantoms {phantoms}"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(table(results))


def table(results: dict) -> str:
    lines = ["| run | steps | minutes | best own validation (epoch) | fresh MR phantoms: " + ", ".join(ORGANS) +
             " | sample study ml: " + ", ".join(ORGANS) + " |", "|---|---|---|---|---|---|"]
    for name, run in results["runs"].items():
        fresh = ", ".join(f"{run['fresh_mr_phantoms'][o]['dice']:.3f}" for o in ORGANS)
        ml = ", ".join(f"{run['sample_study_ml'][o]:g}" for o in ORGANS)
        lines.append(f"| {name} | {run['steps']} | {run['minutes']} | {run['best_own_validation']:.3f} ({run['best_epoch']}) | "
                     f"{fresh} | {ml} |")
    ranges = ", ".join(f"{lo:g}-{hi:g}" for lo, hi in results["plausible_ml"].values())
    lines.append(f"| plausible (infer task's warning ranges) | | | | | {ranges} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
