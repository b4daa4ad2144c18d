"""The figure in sample-datasets/README.md: real CT and MR slices beside phantom slices (every contrast phase,
arms and table, T1- and T2-like MR), in the radiological convention (patient's right on the left, front up).

    .venv/bin/python scripts/phantom_figure.py --out sample-datasets/phantoms_vs_real.png

The real slices come from ../shared/data (ct_a_full, mr_a); without it the real panels are left out.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

from progidiff.labels import ORGAN_IDS  # noqa: E402
from progidiff.phantoms import make_phantom  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
CT_WINDOW = (-160, 240)


def radiological(axial: np.ndarray) -> np.ndarray:
    """An RAS axial slice [X, Y] as a radiologist looks at it: rows from front to back, patient's right on the left."""
    return axial.T[::-1, ::-1]


def organ_slice(label: np.ndarray, organ: str) -> int:
    return int(np.argmax((label == ORGAN_IDS[organ]).sum(axis=(0, 1))))


def real_panels(kind: str) -> list[tuple[str, np.ndarray, str]]:
    if kind == "ct" and (SHARED / "ct_a_full").is_dir():
        ct = np.asarray(nib.load(SHARED / "ct_a_full" / "image.nii.gz").dataobj, dtype=np.float32)
        return [(f"REAL CT, non-contrast, {what}", ct[:, :, z], "ct") for z, what in ((92, "pancreas level"),
                                                                                   (104, "upper abdomen"))]
    if kind == "mr" and (SHARED / "mr_a").is_dir():
        mr = np.asarray(nib.load(SHARED / "mr_a" / "image.nii.gz").dataobj, dtype=np.float32)
        return [("REAL MR (mr_a), T1-like", mr[:, :, 12], "mr")]
    return []


def phantom_panels() -> list[tuple[str, np.ndarray, str]]:
    panels = []
    for seed, phase in ((9000, "non-contrast"), (9001, "arterial"), (9002, "portal-venous"), (9003, "delayed")):
        p = make_phantom(seed, phase=phase, slice_mm=3.0)
        z = organ_slice(p.label, "pancreas")
        panels.append((f"phantom {seed}, {phase}", p.ct[:, :, z], "ct"))
    for seed in range(9004, 9100):  # the first later seed with arms at the sides and a table
        p = make_phantom(seed, slice_mm=3.0)
        if p.meta["arms_at_sides"] and p.meta["table"]:
            z = organ_slice(p.label, "liver")
            panels.append((f"phantom {seed}, {p.meta['contrast']}, arms and table", p.ct[:, :, z], "ct"))
            break
    for seed in range(9100, 9200):  # one T1-like and one T2-like MR twin
        p = make_phantom(seed, slice_mm=3.0)
        if p.meta["mr_sequence"] not in {title.split()[-1] for title, _, kind in panels if kind == "mr"}:
            panels.append((f"phantom {seed}, MR {p.meta['mr_sequence']}", p.mr[:, :, organ_slice(p.label, "pancreas")], "mr"))
        if sum(kind == "mr" for _, _, kind in panels) == 2:
            break
    return panels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "sample-datasets" / "phantoms_vs_real.png")
    args = parser.parse_args()
    phantoms = phantom_panels()
    panels = real_panels("ct") + [p for p in phantoms if p[2] == "ct"] + real_panels("mr") + \
        [p for p in phantoms if p[2] == "mr"]
    columns = 5
    rows = [panels[i : i + columns] for i in range(0, len(panels), columns)]
    fig, axes = plt.subplots(len(rows), columns, figsize=(3.2 * columns, 3.4 * len(rows)), squeeze=False)
    for r, panels in enumerate(rows):
        for c in range(columns):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(panels):
                continue
            title, image, kind = panels[c]
            if kind == "ct":
                ax.imshow(radiological(np.clip(image, *CT_WINDOW)), cmap="gray", vmin=CT_WINDOW[0], vmax=CT_WINDOW[1])
            else:
                ax.imshow(radiological(image), cmap="gray", vmin=0, vmax=np.percentile(image, 99.5))
            ax.set_title(title, fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
