"""A labelled real MR rendered as CT: a second patient's real anatomy for the CT model.

The one labelled real CT (`../shared/data/ct_a_full`) shows only the pancreas head outside the block every
table scores; its body and tail along the splenic vein lie inside that block, and the phantoms' drawn gland
does not look like them.  The labelled MR (`../shared/data/mr_a`) is another patient with the whole gland,
spleen, kidneys and vessels labelled.  Rendering it as CT shows the CT model that anatomy (the mirror of
`pseudo_mr`, which renders the CT as MR for the MR adapter).

Each voxel gets the CT value of its tissue in a patient drawn as the phantoms draw one (`phantoms.Patient`: a
contrast phase, tissue values, kernel and noise): labelled organs by their label (kidneys split by depth into
cortex, medulla and pelvis; vertebrae into marrow and a cortical shell; bowel into wall and content), the
unlabelled body between muscle and fat by its MR signal (fat is the brightest soft tissue and muscle among the
darkest in T1 and T2 alike), air outside the body.  Then the phantoms' scanner (`phantoms.scan_ct`).
Deterministic in `seed`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from . import contrast, pseudo_mr
from .data import Volume
from .labels import ORGAN_IDS
from .modality import intensity_modality
from .phantom_shapes import smooth_field
from .phantoms import PancreasVariant, Patient, scan_ct, texture_of

# Labelled organs → the phantom tissue whose CT value they take, as pseudo-MR maps them; kidneys, bowel and
# bone are split further here.
ORGAN_TISSUE = {organ: tissue for organ, tissue in pseudo_mr.ORGAN_TISSUE.items() if organ not in contrast.KIDNEYS}
BOWEL_WALL_MM = 3.0


def body_mask(mr: np.ndarray, label: np.ndarray) -> np.ndarray:
    """The patient's body: signal above a tenth of the bright fat, or labelled, closed and filled slice by slice,
    its largest connected part."""
    fat = float(np.percentile(mr[mr > np.percentile(mr, 50)], 90))
    body = ndimage.binary_closing((mr > 0.1 * fat) | (label > 0), np.ones((3, 3, 1)), iterations=2)
    body = np.stack([ndimage.binary_fill_holes(body[:, :, z]) for z in range(body.shape[2])], axis=2)
    parts, count = ndimage.label(body)
    if count > 1:
        body = parts == 1 + int(np.argmax(ndimage.sum(body, parts, range(1, count + 1))))
    return body


def signal_of_muscle_and_fat(signal: np.ndarray) -> tuple[float, float]:
    """Typical MR signal of muscle and of fat among unlabelled body voxels: the medians of the dark and the
    bright side of the midpoint between their 10th and 90th percentiles (their histogram has those two modes;
    a fat-to-muscle ratio from the extremes would read shaded fat as half muscle)."""
    low, high = np.percentile(signal, [10, 90])
    bright = signal > (low + high) / 2
    return float(np.median(signal[~bright])), float(np.median(signal[bright]))


def tissue_of_labels(label: np.ndarray, mr: np.ndarray, spacing: tuple[float, float, float]) -> dict[str, np.ndarray]:
    """Tissue name → voxel mask for the labelled voxels."""
    out: dict[str, np.ndarray] = {}

    def add(tissue: str, mask: np.ndarray) -> None:
        out[tissue] = out[tissue] | mask if tissue in out else mask

    for organ, tissue in ORGAN_TISSUE.items():
        add(tissue, label == ORGAN_IDS[organ])
    for organ in contrast.KIDNEYS:
        for tissue, mask in zip(("kidney_cortex", "kidney_medulla", "renal_pelvis"),
                                contrast.kidney_parts(label == ORGAN_IDS[organ], spacing)):
            add(tissue, mask)
    for organ in pseudo_mr.BOWEL:
        bowel = label == ORGAN_IDS[organ]
        if not bowel.any():
            continue
        inside = bowel & (ndimage.distance_transform_edt(bowel, sampling=spacing) > BOWEL_WALL_MM)
        content = inside & (mr < np.median(mr[bowel]))  # dark in T1: fluid
        add("bowel_fluid", content)
        add("bowel_wall", bowel & ~content)
    bone = label == ORGAN_IDS["vertebrae"]
    shell = bone & ~ndimage.binary_erosion(bone, np.ones((3, 3, 1)))
    add("bone_cortex", shell)
    add("bone_marrow", bone & ~shell)
    return out


def render(mr: np.ndarray, label: np.ndarray, spacing: tuple[float, float, float], seed: int,
           pancreas_fat: float = 0.0, phase: str | None = None) -> tuple[np.ndarray, str]:
    """(CT-like HU of the MR `mr` [X, Y, Z] with schema `label`, the contrast phase); `pancreas_fat` as the
    phantoms' (`phantoms.make_phantom`); `phase` one of `contrast.PHASES` (None: drawn, as training does)."""
    rng = np.random.default_rng(seed)
    patient = Patient(rng, phase=phase, slice_mm=spacing[2], pancreas=PancreasVariant(fat=pancreas_fat))
    body = body_mask(mr, label)
    unlabelled = body & (label == 0)
    if not unlabelled.any():
        raise ValueError("the MR has no unlabelled body voxels to read fat and muscle from")
    muscle, fat = signal_of_muscle_and_fat(mr[unlabelled])
    fattiness = np.clip((mr[unlabelled] - muscle) / max(fat - muscle, 1e-6), 0.0, 1.0)
    hu = np.full(mr.shape, patient.value("air")[0], np.float32)
    texture = np.zeros(mr.shape, np.float32)
    hu[unlabelled] = patient.value("muscle")[0] * (1 - fattiness) + patient.value("fat")[0] * fattiness
    texture[unlabelled] = texture_of("fat")
    for tissue, mask in tissue_of_labels(label, mr, spacing).items():
        hu[mask] = patient.value(tissue)[0]
        texture[mask] = texture_of(tissue)
    pancreas = label == ORGAN_IDS["pancreas"]
    fat_share = patient.pancreas_fat_share(mr.shape)[pancreas]
    hu[pancreas] = hu[pancreas] * (1 - fat_share) + patient.value("fat")[0] * fat_share
    hu = ndimage.gaussian_filter(hu, (0.5, 0.5, 0.3))  # partial volume at tissue borders
    speckle = smooth_field(rng, mr.shape, (0.8, 0.8, 0.6))
    ct = scan_ct(hu, speckle * texture, patient, rng)
    return np.clip(ct, -1024, 3071).astype(np.float32), patient.phase


def pseudo_ct_volumes(mr_volume: Volume, count: int, seed: int = 0, pancreas_fat: float = 0.0) -> list[Volume]:
    """`count` CT-like renderings of one labelled MR (seeds `seed`…), each a different patient draw: contrast
    phase, tissue values, kernel and noise (and the pancreas' fat share, up to `pancreas_fat`)."""
    if intensity_modality(mr_volume.image) == "CT":
        raise ValueError(f"{mr_volume.name} reads as CT in HU (air near -1000): --pseudo-ct renders a labelled MR")
    out = []
    for i in range(count):
        image, phase = render(mr_volume.image, mr_volume.label, mr_volume.spacing, seed + i, pancreas_fat)
        name = f"{mr_volume.name}[pseudo-CT {phase} {seed + i}]"
        out.append(dataclasses.replace(mr_volume, image=image, name=name, unenhanced_ct=False))
    return out
