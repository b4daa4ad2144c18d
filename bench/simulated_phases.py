"""Benchmark: what the real non-contrast CT's organs read once moved to each contrast phase, with every voxel of an
organ moved alike (how the default model's recipe trains) and with fat left as it reads (`spare_fat`, what the
benches score since 2026-12-07).  Seconds: it shows whether a simulated phase looks like a scan in that phase.

    .venv/bin/python bench/simulated_phases.py      # → bench/results/simulated_phases.json

The team's real CT `ct_a` (all 30 slices, the held-out block among them) moved as one volume by
`contrast.simulate_phase` with the bench's phase seed (0, `progidiff.evaluate --phase-seed`); per organ the
median HU with the 10th and 90th percentiles, beside the phase's range for the organ's lean tissue.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from progidiff import contrast
from progidiff.data import load_volume_pair
from progidiff.labels import ORGAN_IDS
from progidiff.logs import configure_cli_logging

from held_out import CT_A, UNSEEN_ORGANS as ORGANS  # bench/held_out.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
LEAN_TISSUE = {"kidney_left": "kidney_cortex", "kidney_right": "kidney_cortex", "stomach": "bowel_wall"}


def organ_hu(image: np.ndarray, label: np.ndarray) -> dict[str, list[float]]:
    """organ → [10th percentile, median, 90th percentile] HU over its labelled voxels."""
    return {organ: [round(float(v), 1) for v in np.percentile(image[label == ORGAN_IDS[organ]], [10, 50, 90])]
            for organ in ORGANS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase-seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "simulated_phases.json")
    args = parser.parse_args()
    configure_cli_logging()
    volume = load_volume_pair(CT_A / "image.nii.gz", CT_A / "label.nii.gz", "total", spacing=3.0)
    image, label = volume.image.astype(np.float32), volume.label
    rows = [{"phase": "non-contrast", "moved": "as scanned", "organs": organ_hu(image, label)}]
    for phase in contrast.PHASES[1:]:
        for spare_fat in (False, True):
            moved = contrast.simulate_phase(image, label, ORGAN_IDS, phase, np.random.default_rng(args.phase_seed),
                                            volume.spacing[0], spare_fat=spare_fat)
            rows.append({"phase": phase, "moved": "fat spared" if spare_fat else "every voxel alike",
                         "organs": organ_hu(moved, label)})
    print("| phase | moved | " + " | ".join(ORGANS) + " |")
    print("|---|---|" + "---|" * len(ORGANS))
    for row in rows:
        cells = [f"{p50:.0f} ({p10:.0f} / {p90:.0f})" for p10, p50, p90 in row["organs"].values()]
        print(f"| {row['phase']} | {row['moved']} | " + " | ".join(cells) + " |")
    for index, phase in enumerate(contrast.PHASES):
        ranges = [contrast.TISSUE_HU[LEAN_TISSUE.get(organ, organ)][index] for organ in ORGANS]
        print(f"| {phase} | table range, lean tissue | " + " | ".join(f"{lo}-{hi}" for lo, hi in ranges) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": "bench/simulated_phases.py", "phase_seed": args.phase_seed,
                                    "rows": rows}, indent=1))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
