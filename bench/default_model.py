"""Benchmark: the default ProGiDiff model next to the deterministic baseline, on held-out real CT slices
and on fresh phantoms, through the evaluate CLI.  Prints a Markdown table and saves JSON.

    .venv/bin/python bench/default_model.py --model model/progidiff_ct --baseline model/baseline_ct \\
        --out bench/results/default_model.json

The real-CT rows need ../shared/data/ct_a (slices 10-17 are held out of training); they are skipped,
with a note, when it is absent.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from progidiff import evaluate
from progidiff.phantoms import write_sample_set

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
ORGANS = "liver,spleen,kidney_left,kidney_right,aorta"


def cases(tmp: Path, phantom_seeds: list[int]) -> list[dict]:
    found = []
    if (SHARED / "ct_a").is_dir():
        found.append({"name": "ct_a held-out z 10-17 (real CT)", "image": SHARED / "ct_a" / "image.nii.gz",
                      "label": SHARED / "ct_a" / "label.nii.gz", "label_map": "total", "slices": "10:18"})
    for seed in phantom_seeds:
        write_sample_set(tmp, count=1, seed=seed, mr_count=0)
        found.append({"name": f"fresh phantom seed {seed}", "image": tmp / "ct" / f"phantom_{seed:03d}.nii.gz",
                      "label": tmp / "ct" / "labels" / "final" / f"phantom_{seed:03d}.nii.gz", "label_map": "schema"})
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "model" / "progidiff_ct")
    parser.add_argument("--baseline", type=Path, default=ROOT / "model" / "baseline_ct")
    parser.add_argument("--proposals", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--scheduler", default="ddim", help="ProGiDiff's sampler: ddim, dpm or ddpm (stochastic)")
    parser.add_argument("--spread", type=float, default=None,
                        help="ProGiDiff's organ-prior logit range across proposals (default: the model's)")
    parser.add_argument("--phantom-seeds", default="9000,9001")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "default_model.json")
    args = parser.parse_args()

    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases(Path(tmp), [int(s) for s in args.phantom_seeds.split(",")]):
            for kind, model in (("ProGiDiff", args.model), ("baseline", args.baseline)):
                argv = ["--model", str(model), "--image", str(case["image"]), "--label", str(case["label"]),
                        "--label-map", case["label_map"], "--organs", ORGANS, "--proposals", str(args.proposals),
                        "--steps", str(args.steps), "--scheduler", args.scheduler,
                        "--out", str(args.out.with_name(f"eval_{len(results)}.json"))]
                if "slices" in case:
                    argv += ["--slices", case["slices"]]
                if kind == "ProGiDiff" and args.spread is not None:
                    argv += ["--spread", str(args.spread)]
                result = evaluate.main(argv)
                results.append({"case": case["name"], **result, "kind": kind})
                for organ, s in result["organs"].items():
                    rows.append(f"| {case['name']} | {kind} | {organ} | {s['dice_consensus']:.3f} | {s['dice_best']:.3f} "
                                f"| {s['dice_mean']:.3f} | {s['hd95_consensus'] if s['hd95_consensus'] is not None else '–'} "
                                f"| {result['seconds']:.0f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print("| case | model | organ | Dice consensus | Dice best-of-N | Dice mean | HD95 mm | s (case) |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
