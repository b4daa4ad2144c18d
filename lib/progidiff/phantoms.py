"""Seeded synthetic abdominal CT (and paired MR-like) volumes with organ labels.

Real labelled scans are scarce here (one CT, one MR patient), so training pairs them with
phantoms for shape and position variety.  Each organ is a smoothly deformed ellipsoid placed
where it lies in a real abdomen; HU values follow non-contrast or contrast-enhanced CT; borders
are soft (partial volume); patients vary in size, position, rotation and organ shape.  The MR-like
version maps the same anatomy to T1-like contrasts (each tissue at its median in the one real MR we have,
`../shared/data/mr_a`: fat bright, liver and pancreas brighter than spleen, kidneys and muscle, vessels
dark) with a bias field and Rician-like noise.

Orientation is RAS+ (array axis 0 → patient's right, 1 → anterior, 2 → superior), like the
TotalSegmentator scans in ../shared.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from .io_utils import atomic_file
from .labels import ORGAN_IDS

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Organ:
    """An ellipsoid in canonical body coordinates (mm; x → patient right, y → anterior, z → superior)."""

    name: str
    centre: tuple[float, float, float]
    radii: tuple[float, float, float]
    ct_hu: float  # non-contrast
    ct_hu_contrast: float  # portal-venous phase
    mr: float  # T1-like MR signal (arbitrary units; median of the organ in ../shared/data/mr_a)


# Painted in this order: later organs win where they overlap.
ORGANS: tuple[Organ, ...] = (
    Organ("liver", (68, 5, 40), (82, 85, 75), 55, 110, 97),
    Organ("spleen", (-88, -25, 45), (36, 52, 50), 45, 120, 24),
    Organ("stomach", (-35, 40, 45), (48, 36, 45), 20, 60, 37),
    Organ("kidney_right", (62, -48, -15), (28, 32, 50), 30, 150, 22),
    Organ("kidney_left", (-62, -45, -8), (28, 32, 50), 30, 150, 28),
    Organ("adrenal_gland_right", (40, -30, 35), (6, 10, 14), 25, 60, 160),
    Organ("adrenal_gland_left", (-38, -28, 32), (6, 10, 14), 25, 60, 110),
    Organ("duodenum", (35, 20, -10), (16, 14, 35), 25, 70, 37),
    Organ("pancreas", (-5, 0, 10), (55, 11, 12), 40, 100, 113),
    Organ("gallbladder", (55, 45, 5), (16, 18, 30), 5, 10, 54),
    Organ("portal_vein_and_splenic_vein", (10, 2, 25), (42, 6, 6), 45, 170, 44),
    Organ("inferior_vena_cava", (22, -22, 0), (11, 9, 200), 40, 140, 30),
    Organ("aorta", (-5, -30, 0), (10, 10, 200), 42, 180, 27),
    Organ("vertebrae", (0, -68, 0), (21, 19, 200), 250, 260, 153),
)

# Bowel loops fill the rest of the abdominal cavity: colon framing it, small bowel in the middle.
BOWEL = {"colon": (25.0, 75.0, 40.0), "small_bowel": (30.0, 90.0, 31.0)}  # (CT HU, contrast HU, MR)

AIR, FAT, MUSCLE = -1000.0, -95.0, 50.0
MR_AIR, MR_FAT, MR_MUSCLE = 0.0, 380.0, 14.0
PHANTOM_ORGANS: tuple[str, ...] = tuple(o.name for o in ORGANS)


@dataclass
class Phantom:
    ct: np.ndarray  # int16 HU
    mr: np.ndarray  # int16 MR-like signal
    label: np.ndarray  # uint8, values of labels.ORGAN_IDS
    affine: np.ndarray  # 4×4, RAS+
    meta: dict


def _soft_inside(d: np.ndarray, width: float) -> np.ndarray:
    """Occupancy in [0,1] from a normalised ellipsoid distance (1 on the surface).

    `width` is one voxel in the same normalised units (voxel / radius): the border blurs over about
    one voxel, the partial-volume effect of a real scanner.
    """
    return 1.0 / (1.0 + np.exp(np.clip((d - 1.0) / max(width, 1e-4) * 2.0, -50, 50)))


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field / (field.std() + 1e-8)


def _paint_bowel(rng, wx, wy, wz, cavity, voxel, contrast, paint, label) -> None:
    """Colon as two lateral tubes and an anterior transverse one; small bowel as clustered loops."""
    inside = np.clip(1.0 - (cavity - 0.95) * 20, 0, 1)
    tubes = [((95, -10), 20), ((-95, -10), 18)]  # ascending (right), descending (left), in x-y
    d_colon = np.min([np.sqrt(((wx - x) / r) ** 2 + ((wy - y) / r) ** 2) for (x, y), r in tubes], axis=0)
    transverse = np.sqrt(((wy - 70) / 18) ** 2 + ((wz + 5) / 18) ** 2) + np.clip(np.abs(wx) / 110 - 1, 0, None) * 5
    d_colon = np.minimum(d_colon, transverse)
    loops = []
    for _ in range(14):
        c = np.array([rng.uniform(-70, 70), rng.uniform(-5, 75), rng.uniform(-80, 0)])
        r = rng.uniform(14, 22)
        loops.append(np.sqrt(((wx - c[0]) / r) ** 2 + ((wy - c[1]) / r) ** 2 + ((wz - c[2]) / r) ** 2))
    d_small = np.min(loops, axis=0)
    for name, d in (("small_bowel", d_small), ("colon", d_colon)):
        ct_hu, ct_contrast, mr_value = BOWEL[name]
        occupancy = _soft_inside(d, voxel / 18) * inside
        paint(occupancy, (ct_contrast if contrast else ct_hu) + rng.normal(0, 6), mr_value)
        label[occupancy >= 0.5] = ORGAN_IDS[name]


def make_phantom(
    seed: int, shape: tuple[int, int, int] = (128, 104, 40), spacing: tuple[float, float, float] = (3.0, 3.0, 3.0)
) -> Phantom:
    """One synthetic patient: CT, MR-like image and schema label map, deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    sx, sy, sz = shape
    # World grid (mm), centred on the volume; z offset picks which part of the abdomen is covered.
    z_offset = rng.uniform(-20, 20)
    xs = (np.arange(sx) - (sx - 1) / 2) * spacing[0]
    ys = (np.arange(sy) - (sy - 1) / 2) * spacing[1]
    zs = (np.arange(sz) - (sz - 1) / 2) * spacing[2] + z_offset
    X, Y, Z = np.meshgrid(xs, ys, zs, indexing="ij")

    # Patient variation: size, in-plane rotation and shift.
    scale = rng.uniform(0.85, 1.12)
    angle = np.deg2rad(rng.uniform(-8, 8))
    shift = rng.uniform(-12, 12, size=2)
    cx = (np.cos(angle) * (X - shift[0]) + np.sin(angle) * (Y - shift[1])) / scale
    cy = (-np.sin(angle) * (X - shift[0]) + np.cos(angle) * (Y - shift[1])) / scale
    cz = Z / scale
    voxel = min(spacing[:2]) / scale

    # Low-frequency deformation shared by all organs, so shapes are not perfect ellipsoids.
    warp = [_smooth_field(rng, shape, 8) * rng.uniform(4, 9) for _ in range(3)]
    wx, wy, wz = cx + warp[0], cy + warp[1], cz + warp[2]

    contrast = bool(rng.random() < 0.5)
    ct = np.full(shape, AIR, dtype=np.float32)
    mr = np.full(shape, MR_AIR, dtype=np.float32)
    label = np.zeros(shape, dtype=np.uint8)

    def paint(occupancy: np.ndarray, ct_value: float, mr_value: float) -> None:
        nonlocal ct, mr
        ct = ct * (1 - occupancy) + ct_value * occupancy
        mr = mr * (1 - occupancy) + mr_value * occupancy

    # Body: subcutaneous fat inside the skin, a muscle wall, then intra-abdominal fat.
    body_a, body_b = rng.uniform(160, 185), rng.uniform(115, 135)
    fat_mm = rng.uniform(8, 24)
    body = np.sqrt((cx / body_a) ** 2 + (cy / body_b) ** 2)
    paint(_soft_inside(body, voxel / body_a), FAT, MR_FAT)
    wall_a, wall_b = body_a - fat_mm, body_b - fat_mm
    paint(_soft_inside(np.sqrt((cx / wall_a) ** 2 + (cy / wall_b) ** 2), voxel / wall_a), MUSCLE, MR_MUSCLE)
    cavity_a, cavity_b = wall_a - 9, wall_b - 9
    cavity = np.sqrt((cx / cavity_a) ** 2 + (cy / cavity_b) ** 2)
    paint(_soft_inside(cavity, voxel / cavity_a), FAT + 10, MR_FAT * 0.9)
    # Paraspinal muscles either side of the spine.
    for side in (-1, 1):
        d = np.sqrt(((cx - side * 32) / 24) ** 2 + ((cy + 75) / 22) ** 2)
        paint(_soft_inside(d, voxel / 22), MUSCLE, MR_MUSCLE)

    _paint_bowel(rng, wx, wy, wz, cavity, voxel, contrast, paint, label)

    for organ in ORGANS:
        centre = np.array(organ.centre) + rng.normal(0, 5, size=3)
        radii = np.array(organ.radii) * rng.uniform(0.85, 1.15, size=3)
        d = np.sqrt(((wx - centre[0]) / radii[0]) ** 2 + ((wy - centre[1]) / radii[1]) ** 2 + ((wz - centre[2]) / radii[2]) ** 2)
        if organ.name == "liver":  # the liver tapers to the left and inferiorly
            d = d + np.clip(-(wx - centre[0]) / radii[0], 0, None) * 0.35 + np.clip(-(wz - centre[2]) / radii[2], 0, None) * 0.3
        if organ.name == "vertebrae":  # vertebral body plus a spinous process behind it
            process = np.sqrt((wx / 6) ** 2 + ((wy - centre[1] + 30) / 18) ** 2)
            d = np.minimum(d, process)
        occupancy = _soft_inside(d, voxel / float(radii[:2].min()))
        if organ.name == "vertebrae":
            occupancy = occupancy * (cavity < 1.15)  # stays inside the body
        else:
            occupancy = occupancy * np.clip(1.0 - (cavity - 0.97) * 20, 0, 1)
        hu = organ.ct_hu_contrast if contrast else organ.ct_hu
        paint(occupancy, hu + rng.normal(0, 6), organ.mr * rng.uniform(0.85, 1.15))
        label[occupancy >= 0.5] = ORGAN_IDS[organ.name]

    # Gas: an anterior pocket in the stomach and bubbles in the colon, kept in their labels.
    stomach = label == ORGAN_IDS["stomach"]
    gas = stomach & (cy > np.percentile(cy[stomach], 70)) if stomach.any() else stomach
    gas |= (label == ORGAN_IDS["colon"]) & (_smooth_field(rng, shape, 2) > 1.0)
    ct[gas] = rng.uniform(-950, -700)
    mr[gas] = 5.0

    # Texture and noise: correlated tissue texture plus white noise, as in a real scan.
    ct += _smooth_field(rng, shape, 1.2) * 8 + rng.normal(0, rng.uniform(8, 18), size=shape)
    bias = np.exp(_smooth_field(rng, shape, 20) * 0.25)
    mr_clean = mr * bias
    noise_sigma = rng.uniform(6, 14)
    mr = np.sqrt((mr_clean + rng.normal(0, noise_sigma, shape)) ** 2 + rng.normal(0, noise_sigma, shape) ** 2)

    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-(sx - 1) / 2 * spacing[0], -(sy - 1) / 2 * spacing[1], z_offset - (sz - 1) / 2 * spacing[2]]
    meta = {"seed": seed, "contrast": "portal-venous" if contrast else "non-contrast", "scale": round(scale, 3)}
    return Phantom(
        ct=np.clip(ct, -1024, 3071).astype(np.int16),
        mr=np.clip(mr, 0, 4000).astype(np.int16),
        label=label,
        affine=affine,
        meta=meta,
    )


def save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write a NIfTI file atomically (a reader never sees half a file)."""
    with atomic_file(path, suffix=".nii.gz") as tmp:
        nib.save(nib.Nifti1Image(array, affine), tmp)


def write_sample_set(out: Path, count: int, seed: int, mr_count: int) -> list[str]:
    """CT studies in `out/ct` (labels in `out/ct/labels/final`), MR-like ones in `out/mr` likewise."""
    names = []
    for i in range(count):
        phantom = make_phantom(seed + i)
        name = f"phantom_{seed + i:03d}"
        save_nifti(phantom.ct, phantom.affine, out / "ct" / f"{name}.nii.gz")
        save_nifti(phantom.label, phantom.affine, out / "ct" / "labels" / "final" / f"{name}.nii.gz")
        if i < mr_count:
            save_nifti(phantom.mr, phantom.affine, out / "mr" / f"{name}_mr.nii.gz")
            save_nifti(phantom.label, phantom.affine, out / "mr" / "labels" / "final" / f"{name}_mr.nii.gz")
        names.append(name)
        logger.info("wrote %s (%s)", name, phantom.meta)
    labels = {organ: value for organ, value in ORGAN_IDS.items()}
    for modality in ("ct", "mr"):
        if (out / modality).is_dir():
            (out / modality / "labels.json").write_text(json.dumps(labels, indent=2) + "\n")
    return names


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write seeded synthetic abdominal CT/MR phantoms with labels.")
    parser.add_argument("--out", type=Path, default=Path("sample-datasets"))
    parser.add_argument("--count", type=int, default=3, help="number of CT phantoms")
    parser.add_argument("--mr-count", type=int, default=2, help="how many of them also get an MR-like twin")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    write_sample_set(args.out, args.count, args.seed, args.mr_count)


if __name__ == "__main__":
    main()
