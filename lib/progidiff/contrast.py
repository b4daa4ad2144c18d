"""CT contrast phases: what each tissue reads in HU, for phantoms and for real non-contrast CT.

The one real CT we train on is non-contrast (aorta ≈ 42 HU), while most abdominal CT that users open is
contrast-enhanced (aorta 150-400 HU, liver 100-130 HU in the portal-venous phase).  One table of ranges per
phase serves both uses: the phantom generator draws each tissue's value from it, and `simulate_phase` moves
the labelled organs of a real non-contrast slice to a drawn phase (keeping its own texture and noise), so
that real anatomy is also seen enhanced.

Ranges follow the usual clinical figures (arterial ≈ 35 s after injection, portal-venous ≈ 70 s, delayed
3-10 min): in the arterial phase the aorta is 250-400 HU, the renal cortex bright against the medulla and
the spleen mottled; in the portal-venous phase the aorta is 150-200 HU, liver 100-130 HU and spleen brighter
than liver; in the delayed phase the collecting systems fill with excreted contrast.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .modality import intensity_modality

PHASES: tuple[str, ...] = ("non-contrast", "arterial", "portal-venous", "delayed")

# tissue → (non-contrast, arterial, portal-venous, delayed) HU ranges (low, high).
TISSUE_HU: dict[str, tuple[tuple[float, float], ...]] = {
    "aorta": ((35, 50), (250, 400), (150, 200), (100, 140)),
    "artery": ((35, 50), (220, 380), (140, 190), (100, 140)),  # iliac, mesenteric, renal arteries
    "inferior_vena_cava": ((35, 50), (60, 110), (120, 170), (100, 130)),
    "portal_vein": ((35, 50), (90, 150), (160, 220), (100, 130)),
    "vein": ((35, 50), (60, 120), (130, 180), (100, 130)),  # renal, iliac, hepatic veins
    "liver": ((50, 65), (60, 85), (100, 130), (80, 100)),
    "spleen": ((40, 50), (100, 160), (110, 140), (80, 100)),
    "kidney_cortex": ((25, 35), (150, 250), (150, 200), (90, 130)),
    "kidney_medulla": ((25, 35), (50, 90), (150, 200), (100, 140)),
    "renal_pelvis": ((0, 15), (0, 15), (10, 30), (300, 900)),
    "pancreas": ((30, 45), (100, 140), (90, 120), (70, 90)),
    "adrenal": ((20, 35), (60, 90), (60, 80), (50, 70)),
    "bowel_wall": ((30, 40), (80, 120), (80, 110), (60, 80)),
    "muscle": ((40, 55), (45, 60), (55, 70), (50, 65)),
    "bladder_urine": ((0, 15), (0, 15), (5, 20), (150, 500)),
}

# A non-contrast real slice is moved to a phase organ by organ: schema organ → tissue of the table above.
ORGAN_TISSUE: dict[str, str] = {
    "aorta": "aorta",
    "inferior_vena_cava": "inferior_vena_cava",
    "portal_vein_and_splenic_vein": "portal_vein",
    "liver": "liver",
    "spleen": "spleen",
    "pancreas": "pancreas",
    "adrenal_gland_left": "adrenal",
    "adrenal_gland_right": "adrenal",
    "duodenum": "bowel_wall",
    "small_bowel": "bowel_wall",
    "colon": "bowel_wall",
    "stomach": "bowel_wall",
}
KIDNEYS = ("kidney_left", "kidney_right")
UNENHANCED_AORTA_HU = 80.0  # a study whose aorta reads below this is non-contrast
FAT_HU = -100.0  # fat does not enhance: what a labelled voxel holds of it stays as it reads


def draw_phase(rng: np.random.Generator, contrast_share: float = 0.75) -> str:
    """Non-contrast with probability 1 − `contrast_share`, else one of the enhanced phases alike."""
    if rng.random() >= contrast_share:
        return PHASES[0]
    return str(rng.choice(PHASES[1:]))


def draw_tissue_hu(rng: np.random.Generator, phase: str) -> dict[str, float]:
    """One patient's HU per tissue in `phase` (one draw per tissue: patients differ in timing and dose)."""
    index = PHASES.index(phase)
    timing = rng.random()  # early or late within the phase, shared by every tissue of this patient
    values = {}
    for tissue, ranges in TISSUE_HU.items():
        low, high = ranges[index]
        mix = float(np.clip(0.6 * timing + 0.4 * rng.random(), 0.0, 1.0))
        values[tissue] = low + (high - low) * mix
    return values


def is_unenhanced(image: np.ndarray, label: np.ndarray, aorta_value: int) -> bool:
    """True for a CT in HU (`modality.intensity_modality`) whose aorta (label value `aorta_value`) reads below
    `UNENHANCED_AORTA_HU` (median): only such studies are moved to other phases.  MR, and a study without a
    visible aorta, are never touched."""
    aorta = label == aorta_value
    if aorta.sum() < 20 or intensity_modality(image) != "CT":
        return False
    return bool(np.median(image[aorta]) < UNENHANCED_AORTA_HU)


def simulate_phase(
    image: np.ndarray,
    label: np.ndarray,
    organ_ids: dict[str, int],
    phase: str,
    rng: np.random.Generator,
    pixel_mm: float = 3.0,
    spare_fat: bool = True,
) -> np.ndarray:
    """A real non-contrast CT slice (or volume) in HU as if acquired in `phase`.

    Each labelled organ's parenchyma is moved to its drawn phase value, over a mask blurred by half a pixel so
    that its border keeps a partial-volume ramp; the slice's own texture and noise stay.  Fat does not enhance:
    a voxel darker than the tissue's lean non-contrast value (its table low, or the organ's median if brighter)
    is read as a mix of parenchyma and fat (`FAT_HU`; from the organ's own voxels around it, `organ_mean`) and
    only its parenchyma share is enhanced, so a gland with fat between its lobules (the real pancreas reads near
    0 HU) stays heterogeneous instead of turning uniformly bright.  `spare_fat=False` moves each organ's voxels
    alike, its median to the drawn value (how the default model's recipe trains; `progidiff.train
    --fat-aware-contrast` chooses for a run).
    Kidneys get a cortex (the outer 5 mm) and medulla of their own, so the arterial phase shows the
    corticomedullary pattern, and in the delayed phase their innermost part (the collecting system) fills.
    Tissues without a label (muscle, unlabelled vessels) are left as they are.
    """
    if phase == PHASES[0]:
        return image
    values = draw_tissue_hu(rng, phase)
    out = image.astype(np.float32, copy=True)

    def enhance(mask: np.ndarray, tissue: str) -> None:
        if mask.sum() < 3:
            return
        soft = ndimage.gaussian_filter(mask.astype(np.float32), 0.5)
        median = float(np.median(image[mask]))
        if not spare_fat:
            out[...] += (values[tissue] - median) * soft
            return
        lean = max(median, TISSUE_HU[tissue][0][0])  # [0]: non-contrast, its low
        parenchyma = np.clip((organ_mean(image, mask) - FAT_HU) / (lean - FAT_HU), 0.0, 1.0)
        out[...] += (values[tissue] - lean) * soft * parenchyma

    for organ, tissue in ORGAN_TISSUE.items():
        if organ in organ_ids:
            enhance(label == organ_ids[organ], tissue)
    sampling = (pixel_mm,) * image.ndim
    for organ in KIDNEYS:
        if organ not in organ_ids:
            continue
        kidney = label == organ_ids[organ]
        if kidney.sum() < 3:
            continue
        cortex, medulla, pelvis = kidney_parts(kidney, sampling)
        if phase != "delayed":  # the collecting system only shows once it fills
            medulla, pelvis = medulla | pelvis, np.zeros_like(pelvis)
        enhance(cortex, "kidney_cortex")
        enhance(medulla, "kidney_medulla")
        enhance(pelvis, "renal_pelvis")
    return out


def organ_mean(image: np.ndarray, mask: np.ndarray, sigma: float = 2.0) -> np.ndarray:
    """`image` smoothed over the voxels of `mask` only (normalised convolution): a voxel's fat share read without
    its noise and without the tissue around the organ; just outside the mask, its nearest voxels' mean (0 farther
    out, where the organ's blurred mask is 0 too)."""
    weight = ndimage.gaussian_filter(mask.astype(np.float32), sigma)
    total = ndimage.gaussian_filter(np.where(mask, image, 0.0).astype(np.float32), sigma)
    return np.divide(total, weight, out=np.zeros_like(total), where=weight > 1e-3)


def kidney_parts(kidney: np.ndarray, sampling: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cortex, medulla, pelvis) masks of a kidney mask by depth: the outer 5 mm, the innermost part (the
    collecting system) and what lies between."""
    depth = ndimage.distance_transform_edt(kidney, sampling=sampling)
    pelvis = kidney & (depth > max(9.0, 0.75 * depth.max(initial=0.0)))
    return kidney & (depth <= 5.0), kidney & (depth > 5.0) & ~pelvis, pelvis
