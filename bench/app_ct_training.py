"""Benchmark: the app's CT train task (`POST /train/progidiff`) fine-tuning the served model on one labelled CT
study, and what that does to patients the run never saw.

What an annotator does: one labelled CT study in the datastore, train with the task's options (10 epochs,
learning rate 1e-4, batch 8 by default; the task holds out the study's top block of slices for its own
validation and publishes an epoch only when that validation beats the served model's by `publish_margin`).
The study (`--study`): `real`, the team's real CT (`../shared/data/ct_a_full`) below the block that no model was
trained on (z 0-91), non-contrast as scanned, a patient the served model was trained on; or `phantom`, a
non-contrast phantom of a seed no model saw, a body the served model never saw.  Each run goes through
`ProGiDiffTrain.train` as MONAI Label calls it, publishing into a temporary folder (never over `model/`), with
the train options of `--runs`.  Scored, for the served model and each run's best epoch (its candidate), through
the evaluate CLI on the unseen-patient cases of `bench/default_model.py`: the held-out real block in every
contrast phase and four fresh phantoms.  N = 5, 1 step, seed 0 (the served defaults).

    .venv/bin/python bench/app_ct_training.py --threads 2 --study real      # → results/app_ct_training_real.json
    .venv/bin/python bench/app_ct_training.py --threads 2 --study phantom
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from progidiff import evaluate
from progidiff.labels import load_class_map
from progidiff.logs import configure_cli_logging
from progidiff.phantoms import save_nifti, write_sample_set

# bench/, beside this script
from default_model import cases, group_mean, mean
from held_out import CT_A_FULL, HELD_OUT_FULL, UNSEEN_ORGANS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "apps" / "progidiff"))
from lib.configs.progidiff import AppSettings  # noqa: E402  (the app's packages, as MONAI Label loads them)
from lib.trainers.progidiff import ProGiDiffTrain  # noqa: E402

GROUPS = ("real CT", "phantoms")
STUDY_SEED = 7000  # `--study phantom`: outside the recipe's seeds (1000-1149) and the scored ones (9000-9003)
logger = logging.getLogger("bench.app_ct_training")


def labelled_study(kind: str, work: Path) -> dict:
    """The datastore's one labelled study, as a datalist item.  `real`: ct_a_full below the held-out block (its
    own affine; z from 0 keeps the origin) with the id → name map of its label, as a viewer's label_info gives it:
    a patient the served model was trained on.  `phantom`: a non-contrast phantom of a seed no model was trained
    or scored on (STUDY_SEED), in the schema's ids: a body the served model never saw."""
    work.mkdir(parents=True, exist_ok=True)
    if kind == "phantom":
        write_sample_set(work, count=1, seed=STUDY_SEED, mr_count=0, slice_mm=3.0, phases=["non-contrast"])
        name = f"phantom_{STUDY_SEED:03d}.nii.gz"
        return {"image": str(work / "ct" / name), "label": str(work / "ct" / "labels" / "final" / name),
                "class_map": None, "id": name}
    item = {"class_map": load_class_map("total", CT_A_FULL / "label.nii.gz"), "id": "ct_a_full_lower"}
    for key, name in (("image", "image.nii.gz"), ("label", "label.nii.gz")):
        source = nib.load(CT_A_FULL / name)
        save_nifti(np.asarray(source.dataobj)[:, :, :HELD_OUT_FULL.start], source.affine, work / name)
        item[key] = str(work / name)
    return item


def parse_run(spec: str) -> dict:
    """'phantoms=8,contrast_rate=0.6' → the train options it sets ('defaults': none)."""
    if spec == "defaults":
        return {}
    return {key: float(value) if "." in value else int(value)
            for key, value in (part.split("=") for part in spec.split(","))}


def train(options: dict, study: dict, work: Path, args: argparse.Namespace) -> tuple[dict, float]:
    """One run of the app's task; (its train stats, minutes)."""
    task = ProGiDiffTrain(args.model, work / "runs", AppSettings.from_conf({"device": "cpu"}, args.model),
                          publish_path=work / "published")
    request = {**task._config, "name": "bench", "run_id": "bench", "device": "cpu", **options}
    task.check_request(request)
    torch.manual_seed(0)
    started = time.time()
    stats = task.train(0, 1, request, [study])
    return stats, (time.time() - started) / 60


def unseen(model: Path, work: Path, args: argparse.Namespace) -> dict:
    """Per group and organ, the mean consensus Dice over the group's cases (and every case's scores)."""
    rows = []
    for i, case in enumerate(cases(work, args.phantom_seed)):
        argv = ["--model", str(model), "--image", str(case["image"]), "--label", str(case["label"]),
                "--label-map", case["label_map"], "--organs", ",".join(UNSEEN_ORGANS), "--slices", case["slices"],
                "--proposals", str(args.proposals), "--steps", str(args.sampling_steps), "--seed", str(args.seed),
                *case["extra"], "--out", str(work / f"eval_{i}.json")]
        rows.append({"case": case["name"], "group": case["group"], "progidiff": evaluate.main(argv)})
    means = {group: {organ: group_mean([r for r in rows if r["group"] == group], organ, "dice_consensus")
                     for organ in UNSEEN_ORGANS} for group in GROUPS}
    for group in GROUPS:
        means[group]["mean"] = mean(list(means[group].values()))
    return {"dice": means, "cases": [{"case": r["case"], "dice": {o: s["dice_consensus"] for o, s in
                                                                  r["progidiff"]["organs"].items()}} for r in rows]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "model" / "progidiff_ct")
    parser.add_argument("--runs", default="phantoms=0,contrast_rate=0.0,publish_margin=0.0;defaults",
                        help="';'-separated runs, each the train options it sets ('defaults': the task's own)")
    parser.add_argument("--study", choices=["real", "phantom"], default="real",
                        help="the labelled study: the real CT below the held-out block, or a fresh phantom")
    parser.add_argument("--phantom-seed", type=int, default=9000, help="the first of the four scored phantoms")
    parser.add_argument("--proposals", type=int, default=5)
    parser.add_argument("--sampling-steps", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/app_ct_training_<study>.json")
    args = parser.parse_args()
    args.out = args.out or ROOT / "bench" / "results" / f"app_ct_training_{args.study}.json"
    configure_cli_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not CT_A_FULL.is_dir():
        raise SystemExit(f"{CT_A_FULL} is absent: the bench trains on the real CT and scores its held-out block")
    results = {"command": "python bench/app_ct_training.py " + " ".join(sys.argv[1:]), "model": str(args.model),
               "study": args.study,
               "torch_threads": torch.get_num_threads(), "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        study = labelled_study(args.study, Path(tmp) / "study")
        results["served"] = unseen(args.model, Path(tmp) / "served", args)
        for spec in args.runs.split(";"):
            work = Path(tmp) / f"run_{len(results['runs'])}"
            stats, minutes = train(parse_run(spec), study, work, args)
            results["runs"][spec] = {
                "minutes": round(minutes, 1), "steps": stats["history"][-1]["step"],
                "options": {k: stats[k] for k in ("phantoms", "real_weight", "contrast_rate", "unenhanced_ct_studies")},
                "served_own_validation": round(stats["served_val_mean_dice"], 4),
                "best_own_validation": round(stats["best_metric"], 4),
                "best_epoch": stats["eval"]["best_metric_epoch"], "published": stats["published"],
                "candidate": unseen(Path(stats["candidate"]), work / "eval", args),
            }
            logger.info("%s: %s", spec, json.dumps(results["runs"][spec]["candidate"]["dice"]))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2))  # after every run: an interrupted bench keeps them
    print(table(results))


def table(results: dict) -> str:
    organs = UNSEEN_ORGANS + ["mean"]
    lines = ["| model | steps | own validation: served → best (epoch), published | group | " + " | ".join(organs) + " |",
             "|---|---|---|---|" + "---|" * len(organs)]
    rows = [("served model", "", "", results["served"])]
    for spec, run in results["runs"].items():
        rows.append((f"fine-tuned, {spec}", run["steps"], f"{run['served_own_validation']:.3f} → "
                     f"{run['best_own_validation']:.3f} ({run['best_epoch']}), {'yes' if run['published'] else 'no'}",
                     run["candidate"]))
    for name, steps, own, scores in rows:
        for group in GROUPS:
            dice = " | ".join("–" if scores["dice"][group][o] is None else f"{scores['dice'][group][o]:.3f}"
                              for o in organs)
            lines.append(f"| {name} | {steps} | {own} | {group} | {dice} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
