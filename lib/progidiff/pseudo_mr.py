"""A labelled real CT rendered as MR-like: real anatomy in MR contrast, for few-shot MR adaptation.

The labelled MR we have is one patient over 20 slices at 3 mm; its upper slices hold a large spleen and no
kidney, which its lower slices never show.  Adapting on those lower slices alone, the MR adapter called the
upper spleen "left kidney" (left, posterior, dark in T1).  The MR-like phantoms show every level but with
drawn shapes.  A labelled real CT of the whole abdomen (`../shared/data/ct_a_full`) shows every level with
real shapes; rendering it in MR contrast gives the adapter that anatomy without any MR label we lack.

Each voxel gets the MR signal of its tissue (`phantoms.TISSUES`, the tissue medians of the real MR): labelled
organs by their label, the rest by the CT's Hounsfield band (air, lung, fat, soft tissue, marrow, cortex),
gas or fluid inside bowel by HU.  Then as the phantoms' MR twin: per-variant tissue values (T1- or T2-like,
±15 %), texture from the CT's own fine detail, partial volume at tissue borders, a bias field and Rician
noise.  Deterministic in `seed`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from .data import Volume
from .labels import ORGAN_IDS
from .phantom_shapes import smooth_field
from .phantoms import TISSUES

# Labelled organs → the tissue whose MR signal they take (bowel and bone are split further by HU).
ORGAN_TISSUE = {
    "liver": "liver", "spleen": "spleen", "kidney_left": "kidney_cortex", "kidney_right": "kidney_cortex",
    "gallbladder": "bile", "pancreas": "pancreas", "adrenal_gland_left": "adrenal",
    "adrenal_gland_right": "adrenal", "aorta": "aorta", "inferior_vena_cava": "inferior_vena_cava",
    "portal_vein_and_splenic_vein": "portal_vein", "urinary_bladder": "bladder_urine",
}
BOWEL = ("stomach", "duodenum", "colon", "small_bowel")
CORTEX_HU = 400.0  # bone above it is cortex, below it marrow (vertebrae too, whatever their HU band)
# Unlabelled voxels by CT band: (upper HU bound, tissue), first match.
HU_BANDS = ((-900.0, "air"), (-500.0, "lung"), (-30.0, "fat"), (120.0, "muscle"), (CORTEX_HU, "bone_marrow"),
            (np.inf, "bone_cortex"))


def tissue_map(ct: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Per voxel, the index of its tissue in the returned list of tissue names."""
    names = sorted({t for _, t in HU_BANDS} | set(ORGAN_TISSUE.values()) | {"gas", "bowel_fluid", "bowel_wall"})
    index = {name: i for i, name in enumerate(names)}
    tissues = np.digitize(ct, [bound for bound, _ in HU_BANDS[:-1]])
    tissues = np.asarray([index[t] for _, t in HU_BANDS])[tissues]
    for organ, tissue in ORGAN_TISSUE.items():
        tissues[label == ORGAN_IDS[organ]] = index[tissue]
    bowel = np.isin(label, [ORGAN_IDS[o] for o in BOWEL])
    tissues[bowel] = index["bowel_wall"]
    tissues[bowel & (ct < 15)] = index["bowel_fluid"]
    tissues[bowel & (ct < -300)] = index["gas"]
    bone = label == ORGAN_IDS["vertebrae"]
    tissues[bone] = np.where(ct[bone] < CORTEX_HU, index["bone_marrow"], index["bone_cortex"])
    return tissues, names


def render(ct: np.ndarray, label: np.ndarray, seed: int) -> tuple[np.ndarray, str]:
    """(MR-like signal of the CT `ct` [X, Y, Z] in HU with schema `label`, "T1" or "T2")."""
    rng = np.random.default_rng(seed)
    sequence = "T1" if rng.random() < 0.7 else "T2"
    tissues, names = tissue_map(ct, label)
    column = 1 if sequence == "T1" else 2
    values = np.asarray([TISSUES[n][column] for n in names], dtype=np.float32) * rng.uniform(0.85, 1.15, len(names))
    mr = ndimage.gaussian_filter(values[tissues], (0.6, 0.6, 0.3))  # partial volume at tissue borders
    detail = ct - ndimage.gaussian_filter(ct.astype(np.float32), 1.5)
    mr = mr * (1 + 0.004 * np.clip(detail, -60, 60))  # the CT's own texture, a few per cent
    mr = mr * np.exp(smooth_field(rng, ct.shape, 20) * 0.25)  # coil shading
    sigma = rng.uniform(6, 14)
    mr = np.sqrt((mr + rng.normal(0, sigma, ct.shape)) ** 2 + rng.normal(0, sigma, ct.shape) ** 2)
    return np.clip(mr, 0, 4000).astype(np.float32), sequence


def pseudo_mr_volumes(ct_volume: Volume, count: int, seed: int = 0) -> list[Volume]:
    """`count` MR-like renderings of one labelled CT (seeds `seed`…), each a different draw of contrast and noise."""
    out = []
    for i in range(count):
        image, sequence = render(ct_volume.image, ct_volume.label, seed + i)
        name = f"{ct_volume.name}[pseudo-MR {sequence} {seed + i}]"
        out.append(dataclasses.replace(ct_volume, image=image, name=name, unenhanced_ct=False))
    return out
