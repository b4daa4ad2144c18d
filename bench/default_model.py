"""Benchmark: how the default ProGiDiff model can be expected to do on a patient it never saw, next to the
deterministic baseline (`model/baseline_ct`; model/README.md says which budget it had).  Prints Markdown tables
and saves JSON.

    .venv/bin/python bench/default_model.py            # → bench/results/default_model.json

Cases, all outside the training data (through the evaluate CLI, scores in the model's 3 mm frame):
- the held-out z-block of the real CT (`../shared/data/ct_a` slices 10-17, the same slices as `ct_a_full`
  92-99, which the recipe holds out), as scanned (non-contrast) and moved to each contrast phase
  (`evaluate --simulate-phase`: the patient's own anatomy and texture, organs at enhanced HU);
- a second patient: the labelled MR `../shared/data/mr_a` rendered as CT (`progidiff.pseudo_ct`, seeds 7000-7003,
  one per contrast phase, none of them a training rendering), scored on its slices no model trains on (z 5-9,
  with the pancreas' body and tail, and 15-19: the recipe's `--pseudo-ct-hold-out`).  The recipe's stage 2 trains
  on renderings of its other slices, as both stages train on the real CT around its block; the stage-1 models of
  model/README.md never saw this patient.  Its organs' values come from their labels, so it tests where the
  organs are found, not how a real scan's borders read;
- fresh phantoms of unseen seeds, one per contrast phase, on the 12 slices around the pancreas (where most of the
  organs lie together; a whole phantom took 25 min a case at one thread).
Per organ: consensus Dice, best-of-N Dice, HD95 of the consensus (mm), bracketing (share of the reference
inside the most generous proposal; share of the tightest proposal inside the reference) and the generalized
energy distance of the proposals to the reference; the baseline's Dice and HD95 beside them.  Then the means
per group of cases, against the goal of the unseen-patient issue.
The real-CT and second-patient rows need ../shared/data; they are skipped, with a note, when it is absent.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from progidiff import contrast, evaluate
from progidiff.data import load_volume_pair
from progidiff.logs import configure_cli_logging
from progidiff.phantoms import pancreas_block, save_nifti, write_sample_set
from progidiff.pseudo_ct import render

# bench/held_out.py, beside this script
from held_out import CT_A, HELD_OUT_SLICES, HELD_OUT_Z, MR_A, MR_A_HELD_OUT, UNSEEN_ORGANS

ROOT = Path(__file__).resolve().parents[1]
# The unseen-patient goal: consensus Dice per organ, and bracketing both ways for these organs.
GOAL_DICE = {"liver": 0.92, "spleen": 0.90, "stomach": 0.75, "aorta": 0.85, "pancreas": 0.60, "inferior_vena_cava": 0.60}
GOAL_BRACKETING = ("liver", "spleen", "kidney_left", "kidney_right")
GOAL_BRACKETING_MIN = 0.95


GROUPS = ("real CT", "second patient", "phantoms")
SECOND_PATIENT_SEED = 7000  # the recipe's renderings are seeds 0-3
SECOND_PATIENT_PANCREAS_FAT = 0.5  # as the recipe renders it (its --pancreas-fat)


def real_ct_cases() -> list[dict]:
    """The held-out block of the real CT, as scanned and moved to each contrast phase."""
    if not CT_A.is_dir():
        print(f"note: {CT_A} is absent: the real-CT cases are skipped")
        return []
    real = {"image": CT_A / "image.nii.gz", "label": CT_A / "label.nii.gz",
            "label_map": "total", "slices": HELD_OUT_SLICES, "group": "real CT"}
    found = []
    for phase in contrast.PHASES:
        simulated = [] if phase == "non-contrast" else ["--simulate-phase", phase]
        found.append({**real, "name": f"ct_a held-out {HELD_OUT_Z}, {phase}{' (simulated)' if simulated else ''}",
                      "extra": simulated})
    return found


def second_patient_cases(tmp: Path) -> list[dict]:
    """The labelled MR rendered as CT in each contrast phase, its never-trained slices scored."""
    if not MR_A.is_dir():
        print(f"note: {MR_A} is absent: the second-patient cases are skipped")
        return []
    mr = load_volume_pair(MR_A / "image.nii.gz", MR_A / "label.nii.gz", "total_mr", spacing=3.0)
    affine = np.diag([*mr.spacing, 1.0])  # the arrays are RAS already: written so, they load back as they are
    label = tmp / "mr_a_as_ct" / "label.nii.gz"
    save_nifti(mr.label, affine, label)
    found = []
    for i, phase in enumerate(contrast.PHASES):
        seed = SECOND_PATIENT_SEED + i
        ct, _ = render(mr.image, mr.label, mr.spacing, seed, SECOND_PATIENT_PANCREAS_FAT, phase=phase)
        image = tmp / "mr_a_as_ct" / f"{phase}.nii.gz"
        save_nifti(ct, affine, image)
        found.append({"name": f"mr_a as CT (seed {seed}), z {MR_A_HELD_OUT}, {phase}", "image": image, "label": label,
                      "label_map": "schema", "slices": MR_A_HELD_OUT, "group": "second patient", "extra": []})
    return found


def phantom_cases(tmp: Path, phantom_seed: int) -> list[dict]:
    """Fresh phantoms of unseen seeds, one per contrast phase, on the slices around the pancreas."""
    found = []
    for i, phase in enumerate(contrast.PHASES):
        seed = phantom_seed + i
        write_sample_set(tmp, count=1, seed=seed, mr_count=0, slice_mm=3.0, phases=[phase])
        image = tmp / "ct" / f"phantom_{seed:03d}.nii.gz"
        label = tmp / "ct" / "labels" / "final" / f"phantom_{seed:03d}.nii.gz"
        block = pancreas_block(load_volume_pair(image, label, "schema", spacing=3.0).label)
        found.append({"name": f"phantom seed {seed}, {phase}, z {block.start}-{block.stop - 1}", "image": image,
                      "label": label, "label_map": "schema", "slices": f"{block.start}:{block.stop}",
                      "group": "phantoms", "extra": []})
    return found


def cases(tmp: Path, phantom_seed: int, groups: str = "all") -> list[dict]:
    """The cases of `groups`: all, real, second or phantoms."""
    found = []
    if groups in ("all", "real"):
        found += real_ct_cases()
    if groups in ("all", "second"):
        found += second_patient_cases(tmp)
    if groups in ("all", "phantoms"):
        found += phantom_cases(tmp, phantom_seed)
    return found


def mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return round(float(np.mean(values)), 3) if values else None


def group_mean(rows: list[dict], organ: str, key: str) -> float | None:
    """ProGiDiff's mean of one score of one organ over a group's cases."""
    return mean([r["progidiff"]["organs"][organ][key] for r in rows])


def fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "model" / "progidiff_ct")
    parser.add_argument("--baseline", type=Path, default=ROOT / "model" / "baseline_ct")
    parser.add_argument("--organs", default=",".join(UNSEEN_ORGANS))
    parser.add_argument("--proposals", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--scheduler", default="ddim", help="ProGiDiff's sampler: ddim, dpm or ddpm (stochastic)")
    parser.add_argument("--spread", type=float, default=None,
                        help="ProGiDiff's organ-prior logit range across proposals (default: the model's)")
    parser.add_argument("--phantom-seed", type=int, default=9000, help="the first of four phantom seeds")
    parser.add_argument("--cases", choices=["all", "real", "second", "phantoms"], default="all",
                        help="real: the real-CT block in every phase only (a quick sweep); second: the MR patient "
                             "rendered as CT only; phantoms: phantoms only")
    parser.add_argument("--no-baseline", action="store_true", help="score ProGiDiff alone (a quick sweep)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "default_model.json")
    args = parser.parse_args()
    configure_cli_logging()

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases(Path(tmp), args.phantom_seed, args.cases):
            scores = {}
            kinds = (("progidiff", args.model),) + (() if args.no_baseline else (("baseline", args.baseline),))
            for kind, model in kinds:
                argv = ["--model", str(model), "--image", str(case["image"]), "--label", str(case["label"]),
                        "--label-map", case["label_map"], "--organs", args.organs, "--proposals", str(args.proposals),
                        "--steps", str(args.steps), "--scheduler", args.scheduler, *case["extra"],
                        "--out", str(args.out.with_name(f"eval_{len(results)}_{kind}.json"))]
                if "slices" in case:
                    argv += ["--slices", case["slices"]]
                if kind == "progidiff" and args.spread is not None:
                    argv += ["--spread", str(args.spread)]
                scores[kind] = evaluate.main(argv)
            results.append({"case": case["name"], "group": case["group"], **scores})
            save(args, results)  # after every case: an interrupted run keeps what it measured
    print_tables(results, args.organs.split(","))


def save(args: argparse.Namespace, results: list[dict]) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": "python bench/default_model.py", "args": vars(args) | {
        "model": str(args.model), "baseline": str(args.baseline), "out": str(args.out)}, "cases": results},
        indent=2, default=str))


def print_tables(results: list[dict], organs: list[str]) -> None:
    """Per case and organ, then the means per group against the goal (baseline columns '–' without one)."""
    def baseline(r: dict, organ: str, key: str) -> float | None:
        return r["baseline"]["organs"][organ][key] if "baseline" in r else None

    print("| case | organ | Dice consensus | best-of-N | HD95 mm | reference inside most generous | tightest inside "
          "reference | GED | baseline Dice | baseline HD95 mm |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        for organ in organs:
            s = r["progidiff"]["organs"][organ]
            print(f"| {r['case']} | {organ} | {s['dice_consensus']:.3f} | {s['dice_best']:.3f} | "
                  f"{fmt(s['hd95_consensus'], 1)} | {s['bracketing_inside_generous']:.3f} | "
                  f"{s['bracketing_tightest_inside']:.3f} | {s['ged']:.3f} | {fmt(baseline(r, organ, 'dice_consensus'))} | "
                  f"{fmt(baseline(r, organ, 'hd95_consensus'), 1)} |")
    seconds = {kind: mean([r[kind]["seconds"] for r in results if kind in r]) for kind in ("progidiff", "baseline")}
    print(f"\nMeans per group (seconds per case: ProGiDiff {seconds['progidiff']}, baseline {seconds['baseline']})")
    print("| group | organ | Dice consensus | best-of-N | baseline Dice | consensus ≥ baseline | goal Dice | "
          "reference inside most generous | tightest inside reference | goal bracketing |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for group in GROUPS:
        rows = [r for r in results if r["group"] == group]
        if not rows:
            continue
        for organ in organs:
            cons, base = group_mean(rows, organ, "dice_consensus"), mean([baseline(r, organ, "dice_consensus") for r in rows])
            inside = group_mean(rows, organ, "bracketing_inside_generous")
            tight = group_mean(rows, organ, "bracketing_tightest_inside")
            goal = GOAL_DICE.get(organ)
            goal_text = f"≥ {goal} {'met' if cons >= goal else 'not met'}" if goal else "–"
            bracket_text = ("–" if organ not in GOAL_BRACKETING else
                            "met" if min(inside, tight) >= GOAL_BRACKETING_MIN else "not met")
            versus = "–" if base is None else "yes" if cons >= base else "no"
            print(f"| {group} | {organ} | {cons:.3f} | {group_mean(rows, organ, 'dice_best'):.3f} | {fmt(base)} | {versus} | "
                  f"{goal_text} | {inside:.3f} | {tight:.3f} | {bracket_text} |")


if __name__ == "__main__":
    main()
