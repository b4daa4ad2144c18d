"""Seeded synthetic abdominal CT (and paired MR) volumes with organ labels, made to look like real scans.

Real labelled scans are scarce here (one CT, one MR patient), so training pairs them with phantoms for the
variety a model meets on patients it never saw.  Each phantom is one procedurally built patient:

- **body**: skin, subcutaneous fat (thin to obese, thicker in front), abdominal-wall, paraspinal, psoas and
  quadratus muscles, visceral fat with mesenteric strands; lung bases above a domed diaphragm; the heart
  when the scan reaches it; arms at the sides and a table (with its pad) in a share of patients;
- **skeleton**: vertebrae (cortex, marrow, spinal canal, posterior elements) with discs between them, ribs
  7-12 wrapping the upper abdomen and descending as they go forward, costal cartilage to the midline;
- **organs from deformable templates** (atlas-like shapes in body coordinates, deformed per patient by
  size, pose and a smooth warp, never plain ellipsoids): liver with right, left and caudate lobes under the
  diaphragm and its hepatic and portal veins; spleen with its hilum; stomach along a J with fundus, rugae,
  fluid and a gas-fluid level; duodenal C-loop around the pancreas; pancreas head-body-tail along the
  splenic vein (`PancreasVariant`: lean, or with fat between its lobules; in the template's pose, or in one
  drawn per patient with the duodenal C following; packed among its neighbours, or in a bed of
  retroperitoneal fat); kidneys with cortex, medulla, sinus
  fat and pelvis; adrenal glands; gallbladder; colon with haustra, stool and gas; small-bowel loops; aorta
  with its bifurcation, celiac, SMA and renal arteries; IVC beside it behind the liver, renal veins,
  portal/splenic vein and SMV; bladder when the scan reaches the pelvis;
- **acquisition**: a contrast phase drawn per patient (`progidiff.contrast`: non-contrast, arterial,
  portal-venous, delayed, with oral contrast sometimes), scanner noise scaled by body size, a smooth or
  sharp reconstruction kernel, slice thickness 1.5-5 mm, field of view and positioning variation;
- **MR twin**: the same anatomy as T1-like (tissue medians of the real MR in `../shared/data/mr_a`: fat bright,
  liver and pancreas brighter than spleen, kidneys and muscle, vessels dark) or T2-like (fluid bright,
  spleen brighter than liver), with a bias field and Rician noise.

Orientation is RAS+ (array axis 0 → patient's right, 1 → anterior, 2 → superior), like the
TotalSegmentator scans in ../shared.  In-plane spacing is 3 mm (the model's frame); slices vary.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from . import contrast
from .io_utils import atomic_file
from .labels import ORGAN_IDS
from .phantom_shapes import Box, Canvas, ellipsoid, rotation, smooth_field, smooth_union, tube, vertical_tube

logger = logging.getLogger(__name__)

IN_PLANE_MM = 3.0
SLICE_MM = (1.5, 2.0, 2.5, 3.0, 3.0, 3.0, 4.0, 5.0)  # drawn per patient: 3 mm most often

# Tissues that do not enhance: CT HU range, T1-like and T2-like MR signal.  Enhancing tissues take their CT
# value from `contrast.TISSUE_HU` and their MR signal from here.
TISSUES: dict[str, tuple[tuple[float, float] | None, float, float]] = {
    "air": ((-1000, -1000), 0, 0),
    "skin": ((20, 60), 100, 120),
    "fat": ((-115, -85), 380, 260),
    "visceral_fat": ((-105, -75), 340, 240),
    "muscle": (None, 14, 40),
    "bone_cortex": ((500, 1000), 5, 5),
    "bone_marrow": ((120, 300), 153, 160),
    "disc": ((60, 100), 20, 250),
    "csf": ((0, 20), 10, 480),
    "rib": ((250, 500), 60, 60),
    "cartilage": ((80, 180), 30, 60),
    "lung": ((-880, -800), 5, 5),
    "heart": ((35, 50), 30, 60),
    "liver": (None, 97, 70),
    "spleen": (None, 24, 180),
    "kidney_cortex": (None, 28, 160),
    "kidney_medulla": (None, 22, 220),
    "renal_pelvis": (None, 10, 450),
    "pancreas": (None, 113, 110),
    "adrenal": (None, 130, 100),
    "bowel_wall": (None, 37, 90),
    "bowel_fluid": ((0, 25), 20, 350),
    "stool": ((-60, 40), 40, 120),
    "gas": ((-1000, -900), 5, 5),
    "bile": ((0, 20), 54, 450),
    "bladder_urine": (None, 10, 480),
    "aorta": (None, 27, 20),
    "artery": (None, 27, 20),
    "inferior_vena_cava": (None, 30, 30),
    "portal_vein": (None, 44, 30),
    "vein": (None, 30, 30),
    "calcification": ((300, 800), 5, 5),
    "table_shell": ((150, 400), 0, 0),
    "table_foam": ((-950, -800), 0, 0),
    "pad": ((-700, -300), 0, 0),
}

# Texture amplitude (HU) of each tissue: the correlated speckle of real tissue, before scanner noise.
TEXTURE = {"fat": 8.0, "visceral_fat": 10.0, "liver": 6.0, "spleen": 6.0, "pancreas": 18.0, "stool": 120.0,
           "lung": 60.0, "bone_marrow": 40.0, "muscle": 6.0, "bowel_fluid": 6.0, "kidney_cortex": 8.0}


def texture_of(tissue: str) -> float:
    """Texture amplitude (HU) of a tissue: its own, or the faint default of tissues without one."""
    return TEXTURE.get(tissue, 4.0)

# Vertebral levels (body centre, mm) in body coordinates: thoracic 28 mm apart, lumbar 33.
VERTEBRAE = {"T7": 222, "T8": 196, "T9": 170, "T10": 142, "T11": 112, "T12": 80, "L1": 46, "L2": 13, "L3": -20,
             "L4": -53, "L5": -86, "S1": -118}

# Organs every phantom holds (the bladder only when the scan reaches the pelvis).
PHANTOM_ORGANS: tuple[str, ...] = (
    "liver", "spleen", "stomach", "kidney_right", "kidney_left", "adrenal_gland_right", "adrenal_gland_left",
    "duodenum", "pancreas", "gallbladder", "portal_vein_and_splenic_vein", "inferior_vena_cava", "aorta",
    "vertebrae", "colon", "small_bowel",
)

AORTA_X = -14.0  # mm, the aorta's axis right-left at the pancreas' level (`paint_vessels`)
# Pancreas control points: head in the duodenal C, neck over the portal confluence, body over the aorta, tail to
# the spleen; and the duodenal C around the head.
PANCREAS_COURSE = np.array([(28, -6, 4), (40, 4, 15), (15, 18, 28), (-10, 16, 35), (-40, 5, 42), (-64, -12, 50),
                            (-78, -25, 57)], np.float32)
PANCREAS_NECK = 2
DUODENUM_COURSE = np.array([(34, 30, 36), (50, 10, 38), (56, -5, 30), (56, -6, -10), (25, -4, -28), (-12, -4, -28),
                            (-24, 2, -5)], np.float32)
MAX_PANCREAS_FAT = 0.9  # no voxel of a gland is all fat: it would not be the organ any more


@dataclass(frozen=True)
class PancreasVariant:
    """How the phantoms' pancreas departs from the template's lean gland packed among its neighbours; the default,
    all off, makes the default phantoms. One value travels from the command line to `Patient`."""

    fat: float = 0.0  # fat between the lobules: each patient's mean share drawn from 0 to this (0: lean)
    pose: bool = False  # each patient's pose drawn (`PancreasPose.draw`) instead of the template's
    bed: bool = False  # the gland laid in retroperitoneal fat 4-12 mm deep instead of among its neighbours

    def __post_init__(self) -> None:
        if not 0 <= self.fat < MAX_PANCREAS_FAT:
            raise ValueError(f"pancreas fat share {self.fat}: give a share from 0 (lean) up to below "
                             f"{MAX_PANCREAS_FAT}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> PancreasVariant:
        """The variant that `add_pancreas_arguments`' flags ask for."""
        return cls(args.pancreas_fat, args.pancreas_pose, args.pancreas_bed)


def pancreas_fat_arg(text: str) -> float:
    """The argparse type of `--pancreas-fat`: a share from 0 (lean glands) up to below `MAX_PANCREAS_FAT`."""
    try:
        return PancreasVariant(fat=float(text)).fat
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_pancreas_arguments(parser: argparse.ArgumentParser, fat_reaches: str = "the phantoms") -> None:
    """`--pancreas-fat`, `--pancreas-pose` and `--pancreas-bed` (read back with `PancreasVariant.from_args`)."""
    parser.add_argument("--pancreas-fat", type=pancreas_fat_arg, default=0.0, metavar="SHARE",
                        help=f"fat between the pancreas' lobules in {fat_reaches}: each patient's mean share drawn "
                             "from 0 to SHARE (default 0: lean glands; a real gland at 3 mm often reads near 0 HU)")
    parser.add_argument("--pancreas-pose", action="store_true",
                        help="draw each phantom patient's pancreas pose (closer to the midline or not, a taller or "
                             "shorter head, a flatter or steeper body; the duodenal C follows) instead of the "
                             "template's")
    parser.add_argument("--pancreas-bed", action="store_true",
                        help="lay each phantom patient's pancreas in retroperitoneal fat 4-12 mm deep, which keeps "
                             "the solid organs and bowel off the gland (duodenum, stomach and vessels as they were), "
                             "instead of packing it among its neighbours")


@dataclass
class Phantom:
    ct: np.ndarray  # int16 HU
    mr: np.ndarray  # int16 MR signal
    label: np.ndarray  # uint8, values of labels.ORGAN_IDS
    affine: np.ndarray  # 4×4, RAS+
    meta: dict


@dataclass(frozen=True)
class PancreasPose:
    """Where one patient's pancreas lies against the template's course (the identity by default).

    Real glands sit closer to the midline than the template's and vary in how tall the head is and how steeply
    body and tail rise (`ct_a_full`: head 32-35 mm right of the aorta, a tall head and a near-flat body;
    `mr_a`: 25-29 mm, a short head and a steep body; phantoms 1000-1007 in the template's pose: 39-70 mm).
    Drawn poses cover both, so that a model has to find the gland rather than its usual place."""

    x_scale: float = 1.0  # right-left distances from the aorta's axis, of the gland and the duodenal C around it
    head_z_scale: float = 1.0  # the head's height, from its lowest point to the neck
    body_z_scale: float = 1.0  # the rise of body and tail beyond the neck
    shift: tuple[float, float, float] = (0.0, 0.0, 0.0)  # mm, the whole gland

    @classmethod
    def draw(cls, rng: np.random.Generator) -> PancreasPose:
        return cls(float(rng.uniform(0.55, 1.05)), float(rng.uniform(0.5, 1.3)), float(rng.uniform(0.3, 1.3)),
                   tuple(float(v) for v in rng.normal(0, [4, 5, 8])))

    def moved_in_x(self, points: np.ndarray) -> np.ndarray:
        """`points` with their right-left distance from the aorta's axis scaled (the duodenum follows the head)."""
        out = points.copy()
        out[:, 0] = AORTA_X + (points[:, 0] - AORTA_X) * self.x_scale
        return out

    def posed(self, course: np.ndarray) -> np.ndarray:
        """The gland's control points (head first, `PANCREAS_NECK` the neck) in this pose."""
        out = self.moved_in_x(course)
        z0, neck = course[0, 2], course[PANCREAS_NECK, 2]
        head_z = z0 + (np.minimum(course[:, 2], neck) - z0) * self.head_z_scale
        out[:, 2] = head_z + np.maximum(course[:, 2] - neck, 0) * self.body_z_scale
        return out + np.asarray(self.shift, np.float32)


class Patient:
    """The draws that make one patient and one acquisition, and the tissue values they imply."""

    def __init__(self, rng: np.random.Generator, phase: str | None, slice_mm: float | None,
                 pancreas: PancreasVariant = PancreasVariant()):
        self.rng = rng
        self.phase = phase or contrast.draw_phase(rng)
        self.hu = contrast.draw_tissue_hu(rng, self.phase)
        self.oral_contrast = self.phase != "non-contrast" and rng.random() < 0.2
        self.sequence = "T1" if rng.random() < 0.7 else "T2"
        self.slice_mm = float(slice_mm or rng.choice(SLICE_MM))
        size = rng.uniform(0.88, 1.12)
        self.scale = size * rng.uniform(0.95, 1.05, size=3)
        self.angle = float(np.deg2rad(rng.uniform(-7, 7)))
        self.shift = rng.uniform([-20, -15], [20, 15])
        self.fat = rng.gamma(2.0, 9.0) + 6.0  # subcutaneous fat, mm (lean to obese)
        self.cavity = (128 * rng.uniform(0.94, 1.06), 92 * rng.uniform(0.92, 1.08), 78 * rng.uniform(0.95, 1.05))
        self.wall, self.back = rng.uniform(10, 16), rng.uniform(38, 48)  # abdominal wall; paraspinals behind
        self.fat_front, self.fat_back = self.fat * rng.uniform(1.0, 1.6), self.fat * rng.uniform(0.4, 0.8)
        self.body_side = self.cavity[0] + self.wall + self.fat  # half-width of the body
        self.body_back = self.cavity[2] + self.back + self.fat_back  # from the body's centre to its back
        self.arms = rng.random() < 0.35
        self.table = rng.random() < 0.7
        self.sharp_kernel = rng.random() < 0.4
        self.noise_hu = rng.uniform(6, 22) * (1 + self.fat / 60)
        self.values: dict[str, tuple[float, float]] = {}
        # Fatty infiltration of the pancreas: the gland's mean fat share, drawn up to `pancreas.fat` (0: lean).
        # Its own stream, so that every other draw of a seed stays what it was.
        self._pancreas_rng = rng.spawn(1)[0]
        self.pancreas_fat = float(self._pancreas_rng.uniform(0.0, pancreas.fat)) if pancreas.fat > 0 else 0.0
        # The gland's pose (a stream of its own too): the template's, or drawn per patient.
        self.pancreas_pose = PancreasPose.draw(rng.spawn(1)[0]) if pancreas.pose else PancreasPose()
        # The depth (mm) of the fat bed around the gland (0: none; a stream of its own as well). Real glands lie in
        # retroperitoneal fat (`ct_a_full`: 58 % of the 4 mm around the gland below -40 HU, 94 % unlabelled), where
        # the template's gland touches liver, gallbladder and bowel (26-41 % below -40 HU; phantoms 1000, 1001, 1003).
        self.pancreas_bed_mm = float(rng.spawn(1)[0].uniform(4.0, 12.0)) if pancreas.bed else 0.0

    def pancreas_fat_share(self, shape: tuple[int, ...]) -> np.ndarray:
        """Share of fat in each voxel of a pancreas region of `shape`: the patient's mean, patchy between lobules
        (a real gland at 3 mm, fat between its lobules, often reads near 0 HU where lean parenchyma reads 30-45)."""
        if self.pancreas_fat == 0:
            return np.zeros(shape, np.float32)
        patches = smooth_field(self._pancreas_rng, shape, 0.8)
        return np.clip(self.pancreas_fat + 0.15 * patches, 0.0, MAX_PANCREAS_FAT).astype(np.float32)

    def value(self, tissue: str) -> tuple[float, float]:
        """(CT HU, MR signal) of a tissue in this patient, drawn once and kept."""
        if tissue not in self.values:
            hu_range, t1, t2 = TISSUES[tissue]
            if hu_range is None:
                ct = self.hu[tissue]
            else:
                ct = self.rng.uniform(*hu_range)
            mr = (t1 if self.sequence == "T1" else t2) * self.rng.uniform(0.85, 1.15)
            if self.oral_contrast and tissue == "bowel_fluid":
                ct = self.rng.uniform(150, 300)
            self.values[tissue] = (float(ct), float(mr))
        return self.values[tissue]


class Painter:
    """Paints tissues on a canvas with this patient's values; `clip` keeps organs inside the cavity."""

    def __init__(self, canvas: Canvas, patient: Patient):
        self.canvas, self.patient = canvas, patient
        self.cavity_sd: np.ndarray | None = None  # set by paint_body: signed distance to the abdominal cavity
        self.diaphragm: np.ndarray | None = None  # set by paint_body: > 0 above the diaphragm (mm)
        self.splenic_path: np.ndarray | None = None  # set with the pancreas: the splenic vein runs behind it

    def tissue(self, box: Box, sd: np.ndarray, tissue: str, organ: str | None = None, clip: bool = False,
               keep_label: bool = False) -> np.ndarray:
        occupancy = self.canvas.occupancy(sd)
        if clip:
            occupancy *= self.canvas.occupancy(self.cavity_sd[box])
            occupancy *= self.canvas.occupancy(self.diaphragm[box] + 2.0)  # below the diaphragm
        ct, mr = self.patient.value(tissue)
        self.canvas.paint(box, occupancy, ct, mr, ORGAN_IDS[organ] if organ else None,
                          texture_of(tissue), keep_label)
        return occupancy


def superellipse_sd(x: np.ndarray, y: np.ndarray, a: float, b_front: float, b_back: float, power: float) -> np.ndarray:
    """In-plane signed distance (mm, radial) to a superellipse, deeper in front than behind."""
    b = np.where(y >= 0, b_front, b_back)
    q = (np.abs(x / a) ** power + np.abs(y / b) ** power) ** (1.0 / power) + 1e-6
    return ((q - 1.0) * np.sqrt(x ** 2 + y ** 2) / q).astype(np.float32)


def wobble(rng: np.random.Generator, points: list, amount: float) -> np.ndarray:
    """Template control points moved a little per patient: organs keep their shape, not their exact pose."""
    return np.asarray(points, dtype=np.float32) + rng.normal(0, amount, size=(len(points), 3)).astype(np.float32)


def paint_body(p: Painter) -> None:
    canvas, patient, rng = p.canvas, p.patient, p.patient.rng
    x, y, z = canvas.cx, canvas.cy, canvas.cz
    full = canvas.full()
    a, b_front, b_back = patient.cavity
    power = rng.uniform(2.0, 2.6)
    wall, back = patient.wall, patient.back
    outer = superellipse_sd(x, y, patient.body_side, b_front + wall + patient.fat_front, patient.body_back, power)
    p.tissue(full, outer, "skin")
    p.tissue(full, outer + 2.0, "fat")
    muscle = superellipse_sd(x, y, a + wall, b_front + wall, b_back + back, power)
    p.tissue(full, muscle, "muscle")
    cavity = superellipse_sd(x, y, a, b_front, b_back, power)
    p.cavity_sd = cavity
    # Linea alba: the recti part in the midline, fat between them.
    linea = np.maximum(np.abs(x) - rng.uniform(3, 8), -(y - b_front + 2))
    p.tissue(full, np.maximum(linea, muscle), "fat")
    p.tissue(full, cavity, "visceral_fat")
    # Mesenteric strands and small vessels in the visceral fat.
    strands = (smooth_field(rng, canvas.shape, 1.0) > 2.6) & (cavity < -5)
    ct, mr = patient.value("vein")
    canvas.ct[strands] = canvas.ct[strands] * 0.6 + ct * 0.4
    canvas.mr[strands] = canvas.mr[strands] * 0.7 + mr * 0.3
    # Lung bases above a domed diaphragm, each side's dome under its ribs; mediastinum in between.
    dome_r, dome_l = rng.uniform(140, 165), rng.uniform(130, 155)
    dome = np.where(x >= 0, dome_r, dome_l)
    reach = dome - 45 * (((np.abs(x) - 55) / 70) ** 2 + np.clip(-y / 60, 0, None) ** 2 * 0.6 + np.clip(y / 110, 0, None) ** 2 * 0.5)
    p.diaphragm = (z - reach).astype(np.float32)  # > 0 above the diaphragm
    lung_sd = np.maximum(np.maximum(-p.diaphragm + 6.0, cavity + 4.0), 32.0 - np.abs(x) + np.clip(y + 40, 0, None) * 0.2)
    p.tissue(full, lung_sd, "lung")
    heart = ellipsoid((x, y, z), (-15, 30, dome_l + 50), (65, 50, 45))
    p.tissue(full, np.maximum(heart, -p.diaphragm + 8.0), "heart")


def paint_spine_and_muscles(p: Painter) -> None:
    canvas = p.canvas
    y_body, rx, ry = -48.0, 22.0, 17.0
    for name, zc in VERTEBRAE.items():
        lumbar = name.startswith("L") or name == "S1"
        height = (26.0 if lumbar else 20.0) / 2
        box = canvas.box((-70, -115, zc - 22), (70, -20, zc + 22))
        if box is None:
            continue
        x, y, z = canvas.coords(box)
        r = (rx * (1.1 if lumbar else 0.85), ry * (1.05 if lumbar else 0.9))
        body = np.maximum(ellipsoid((x, y, z), (0, y_body, zc), (r[0], r[1], 1e3)), np.abs(z - zc) - height)
        p.tissue(box, body, "bone_cortex", "vertebrae")
        p.tissue(box, body + 2.5, "bone_marrow", "vertebrae")
        disc = np.maximum(ellipsoid((x, y, z), (0, y_body, zc), (r[0] * 0.95, r[1] * 0.95, 1e3)),
                          np.abs(z - zc - (height + 3.5 if lumbar else height + 2.5)) - (3.5 if lumbar else 2.5))
        p.tissue(box, disc, "disc")
        # Posterior elements: pedicles and laminae around the canal, the spinous process behind, transverse processes.
        arch = ellipsoid((x, y, z), (0, y_body - ry - 12, zc - 2), (17, 14, height + 2))
        spinous = tube((x, y, z), np.array([[0, y_body - ry - 20, zc], [0, y_body - ry - 48, zc - 14]], np.float32),
                       np.array([5.5, 4.0], np.float32))
        sides = [tube((x, y, z), np.array([[s * 10, y_body - ry - 10, zc + 2], [s * (46 if lumbar else 30),
                                           y_body - ry - (14 if lumbar else 24), zc + 2]], np.float32),
                      np.array([4.5, 3.5], np.float32)) for s in (-1, 1)]
        elements = np.minimum(np.minimum(arch, spinous), np.minimum(*sides))
        p.tissue(box, elements, "bone_cortex", "vertebrae")
        p.tissue(box, elements + 2.0, "bone_marrow", "vertebrae")
        canal = ellipsoid((x, y, z), (0, y_body - ry - 10, zc), (11, 8.5, 40))
        p.tissue(box, canal, "csf")
    box = canvas.box((-110, -125, -250), (110, -10, 250))
    if box is None:
        return
    x, y, z = canvas.coords(box)
    zs = [VERTEBRAE["T12"] + 10, VERTEBRAE["L2"], VERTEBRAE["L4"], VERTEBRAE["S1"]]
    for side in (-1, 1):
        # Psoas: from T12 beside the vertebral bodies, growing and moving forward down to the pelvis.
        psoas = vertical_tube((x, y, z), zs, [side * 30, side * 38, side * 46, side * 55],
                              [-40, -38, -32, -20], [5, 15, 22, 24], [5, 14, 20, 22])
        p.tissue(box, psoas, "muscle")
        quadratus = vertical_tube((x, y, z), [VERTEBRAE["T12"], VERTEBRAE["L3"], VERTEBRAE["L5"]],
                                  [side * 62, side * 66, side * 70], [-62, -60, -62], [8, 17, 12], [6, 10, 8])
        p.tissue(box, quadratus, "muscle")
        erector = vertical_tube((x, y, z), [-250, 250], [side * 30] * 2, [-100, -100], [27] * 2, [20] * 2)
        p.tissue(box, erector, "muscle")


def paint_ribs(p: Painter) -> None:
    """Ribs 7-12 each side: from beside its vertebra round the body wall, descending as they go forward;
    ribs 7-10 continue as costal cartilage rising towards the midline, 11-12 end free at the side."""
    canvas, rng = p.canvas, p.patient.rng
    for side in (-1, 1):
        for number, level in ((7, "T7"), (8, "T8"), (9, "T9"), (10, "T10"), (11, "T11"), (12, "T12")):
            head = VERTEBRAE[level] + rng.normal(0, 3)
            reach = {7: 2.35, 8: 2.2, 9: 2.0, 10: 1.85, 11: 1.25, 12: 0.95}[number]  # radians round the body
            drop = rng.uniform(100, 140) * (1.0 if number < 11 else 0.6)
            rise = rng.uniform(80, 120)  # costal cartilage climbs this much per radian towards the sternum
            low, high = (0, -200, head - drop - 10), (200, 200, head + 10 + (rise * 1.2 if number <= 10 else 0))
            box = canvas.box((min(side * low[0], side * high[0]), low[1], low[2]),
                             (max(side * low[0], side * high[0]), high[1], high[2]))
            if box is None:
                continue
            x, y, z = canvas.coords(box)
            phi = np.arctan2(side * x, -y - 10)  # 0 behind, π in front, negative on the other side
            dr = p.cavity_sd[box] - 6.0  # radially, 6 mm outside the cavity's boundary
            centre_z = head - drop * np.clip(phi / reach, 0, 1) ** 1.1
            rib = np.sqrt((dr / 5.0) ** 2 + ((z - centre_z) / 4.5) ** 2) - 1.0
            rib = np.where((phi <= reach) & (phi > 0.35), rib * 5.0, 1e3)
            p.tissue(box, rib.astype(np.float32), "rib")
            if number <= 10:  # costal cartilage: on from the rib's tip, rising towards the sternum
                cz = head - drop + np.clip(phi - reach, 0, None) * rise
                cart = np.sqrt((dr / 5.0) ** 2 + ((z - cz) / 4.5) ** 2) - 1.0
                cart = np.where((phi > reach) & (phi < 2.95), cart * 5.0, 1e3)
                p.tissue(box, cart.astype(np.float32), "cartilage")


def paint_bowel(p: Painter) -> None:
    """Colon framing the abdomen (haustra, stool, gas) and small-bowel loops in the middle (fluid, some gas)."""
    rng = p.patient.rng
    colon = wobble(rng, [(85, 0, -95), (95, -10, -30), (95, -5, 25), (78, 30, 48), (40, 62, 20), (0, 68, 5),
                         (-45, 62, 25), (-85, 20, 78), (-95, -10, 40), (-95, -15, -20), (-80, 10, -80),
                         (-40, 30, -105)], 6)
    radii = np.array([30, 25, 24, 22, 21, 20, 20, 20, 18, 17, 16, 15], np.float32) * rng.uniform(0.85, 1.15)
    paint_hollow_tube(p, colon, radii, "colon", content="stool", haustra=True, gas_share=0.9)
    for _ in range(rng.integers(5, 9)):  # small-bowel loops: smooth random walks in the lower middle
        start = rng.uniform([-60, -5, -110], [60, 60, 0])
        points = [start]
        heading = rng.normal(size=3)
        for _ in range(7):
            heading = heading * 0.6 + rng.normal(size=3) * 0.8
            heading /= np.linalg.norm(heading) + 1e-6
            points.append(np.clip(points[-1] + heading * 28, [-75, -15, -130], [75, 70, 15]))
        radius = rng.uniform(10, 15)
        paint_hollow_tube(p, np.asarray(points, np.float32), np.full(len(points), radius, np.float32),
                          "small_bowel", content="bowel_fluid", gas_share=0.3)


def paint_hollow_tube(p: Painter, points: np.ndarray, radii: np.ndarray, organ: str, content: str,
                      haustra: bool = False, gas_share: float = 0.5) -> None:
    """A bowel segment: an enhancing wall around its content; with probability `gas_share` gas on top
    (supine: towards +y), and bubbles in stool."""
    canvas, rng = p.canvas, p.patient.rng
    pad = float(radii.max()) + 4
    box = canvas.box(points.min(axis=0) - pad, points.max(axis=0) + pad)
    if box is None:
        return
    x, y, z = canvas.coords(box)
    sd = tube((x, y, z), points, radii)
    if haustra:  # folds every ~35 mm along the colon
        sd = sd + 2.5 * np.sin((x * 0.7 + y * 0.5 + z * 0.9) * (2 * np.pi / 35.0))
    p.tissue(box, sd, "bowel_wall", organ, clip=True)
    inner = sd + rng.uniform(2.0, 3.5)
    occupancy = p.tissue(box, inner, content, organ, clip=True)
    inside = occupancy > 0.5
    if not inside.any():
        return
    level = np.percentile(canvas.world_y[box][inside], rng.uniform(60, 97)) if rng.random() < gas_share else np.inf
    bubbles = (smooth_field(rng, occupancy.shape, 1.2) > rng.uniform(1.0, 1.8)) & (content == "stool")
    gas = inside & ((canvas.world_y[box] > level) | bubbles)
    ct, mr = p.patient.value("gas")
    canvas.ct[box][gas], canvas.mr[box][gas] = ct, mr
    canvas.texture[box][gas] = 0.0


def paint_stomach_and_duodenum(p: Painter) -> None:
    canvas, rng = p.canvas, p.patient.rng
    stomach = wobble(rng, [(-42, -22, 132), (-55, 12, 105), (-48, 38, 70), (-12, 55, 42), (18, 45, 35),
                           (34, 30, 36)], 5)
    radii = np.array([34, 38, 31, 24, 17, 11], np.float32) * rng.uniform(0.8, 1.2)
    pad = float(radii.max()) + 6
    box = canvas.box(stomach.min(axis=0) - pad, stomach.max(axis=0) + pad)
    if box is not None:
        x, y, z = canvas.coords(box)
        sd = tube((x, y, z), stomach, radii)
        p.tissue(box, sd, "bowel_wall", "stomach", clip=True)
        # Rugae: folds of the mucosa running along the stomach, deeper in the body than in the antrum.
        folds = 3.0 * np.sin(np.arctan2(y - 30, x + 30) * 14 + z * 0.05) * (z > 50)
        content = "bowel_fluid" if rng.random() < 0.75 else "stool"  # fluid, or a meal
        occupancy = p.tissue(box, sd + rng.uniform(3, 5) + folds, content, "stomach", clip=True)
        inside = occupancy > 0.5
        if inside.any():
            level = np.percentile(canvas.world_y[box][inside], rng.uniform(40, 85))
            gas = inside & (canvas.world_y[box] > level)
            ct, mr = p.patient.value("gas")
            canvas.ct[box][gas], canvas.mr[box][gas], canvas.texture[box][gas] = ct, mr, 0.0
    duodenum = wobble(rng, p.patient.pancreas_pose.moved_in_x(DUODENUM_COURSE), 3)
    paint_hollow_tube(p, duodenum, np.full(len(duodenum), rng.uniform(11, 15), np.float32), "duodenum",
                      content="bowel_fluid", gas_share=0.4)


def paint_solid_organs(p: Painter) -> None:
    canvas, rng = p.canvas, p.patient.rng
    jitter = lambda centre, s=6.0: np.asarray(centre) + rng.normal(0, s, 3)  # noqa: E731
    grow = lambda radii, s=0.1: np.asarray(radii) * rng.uniform(1 - s, 1 + s, 3)  # noqa: E731

    # Liver: right lobe, left lobe tapering across the midline, caudate lobe by the IVC; dome under the diaphragm.
    box = canvas.box((-110, -80, -40), (150, 120, 200))
    x, y, z = canvas.coords(box)
    right = ellipsoid((x, y, z), jitter((62, 5, 80)), grow((70, 78, 75)))
    left = ellipsoid((x, y, z), jitter((-20, 42, 98)), grow((62, 34, 38), 0.2), rotation(yaw=0.25))
    caudate = ellipsoid((x, y, z), jitter((15, -12, 88), 3), grow((20, 18, 32)))
    liver = smooth_union(smooth_union(right, left, 14.0), caudate, 8.0)
    liver = liver + 4.0 * smooth_field(rng, liver.shape, 4.0)  # surface irregularity
    p.tissue(box, liver, "liver", "liver", clip=True)
    # Gallbladder in its fossa under the right lobe, fundus forward and down.
    box = canvas.box((0, 0, -40), (100, 100, 90))
    x, y, z = canvas.coords(box)
    gallbladder = ellipsoid((x, y, z), jitter((45, 42, 28), 5), grow((15, 15, 36), 0.2), rotation(pitch=0.5, roll=-0.5))
    p.tissue(box, gallbladder, "bowel_wall", "gallbladder", clip=True)
    p.tissue(box, gallbladder + 2.0, "bile", "gallbladder", clip=True)
    # Spleen: a crescent behind the stomach, its hilum facing forward and in.
    box = canvas.box((-150, -110, 0), (-20, 40, 160))
    x, y, z = canvas.coords(box)
    centre = jitter((-86, -35, 82))
    spleen = ellipsoid((x, y, z), centre, grow((30, 55, 52), 0.15), rotation(yaw=-0.5))
    hilum = ellipsoid((x, y, z), centre + np.array([40, 25, 0]), (32, 40, 60))
    p.tissue(box, np.maximum(spleen, -hilum), "spleen", "spleen", clip=True)
    if p.patient.phase == "arterial":  # arciform enhancement: a mottled spleen in the arterial phase
        mottled = (canvas.label[box] == ORGAN_IDS["spleen"]) & (smooth_field(rng, spleen.shape, 1.5) > 0.3)
        canvas.ct[box][mottled] -= rng.uniform(30, 60)
    # Kidneys: cortex, medulla, sinus fat and pelvis; upper poles tilted in and back, the right one lower.
    for side, organ, zc in ((-1, "kidney_left", 22), (1, "kidney_right", 8)):
        box = canvas.box((side * 70 - 50, -100, zc - 80), (side * 70 + 50, 20, zc + 80))
        if box is None:
            continue
        x, y, z = canvas.coords(box)
        centre = jitter((side * 70, -38, zc), 5)
        turn = rotation(yaw=side * rng.uniform(0.4, 0.7), roll=rng.uniform(-0.1, 0.1), pitch=-side * 0.15)
        kidney = ellipsoid((x, y, z), centre, grow((26, 20, 55), 0.1), turn)
        hilum_at = centre + turn @ np.array([-side * 24, 0, 0])
        sinus = ellipsoid((x, y, z), hilum_at, (16, 11, 30), turn)
        p.tissue(box, kidney, "kidney_cortex", organ, clip=True)
        p.tissue(box, np.maximum(kidney + 6.0, -sinus + 2.0), "kidney_medulla", organ, clip=True, keep_label=True)
        p.tissue(box, np.maximum(sinus, kidney), "fat")
        pelvis = ellipsoid((x, y, z), hilum_at + np.array([-side * 4, 2, -5]), (8, 6, 18), turn)
        p.tissue(box, pelvis, "renal_pelvis", organ, clip=True)
    # Pancreas along its course, in this patient's pose.
    pancreas = wobble(rng, p.patient.pancreas_pose.posed(PANCREAS_COURSE), 3)
    radii = np.array([9, 15, 10, 11, 10, 9, 6], np.float32) * rng.uniform(0.85, 1.15)
    box = canvas.box(pancreas.min(axis=0) - 20, pancreas.max(axis=0) + 20)
    x, y, z = canvas.coords(box)
    lobules = 2.5 * smooth_field(rng, x.shape, 1.0)
    gland_sd = tube((x, y, z), pancreas, radii) + lobules
    if p.patient.pancreas_bed_mm > 0:  # unlabelled fat around it; the duodenal C and the stomach keep their walls
        hollow = np.isin(canvas.label[box], [ORGAN_IDS["duodenum"], ORGAN_IDS["stomach"]])
        p.tissue(box, np.where(hollow, np.float32(1e3), gland_sd - p.patient.pancreas_bed_mm), "visceral_fat", clip=True)
    gland = p.tissue(box, gland_sd, "pancreas", "pancreas", clip=True)
    fat_ct, fat_mr = p.patient.value("fat")
    canvas.paint(box, gland * p.patient.pancreas_fat_share(gland.shape), fat_ct, fat_mr, texture=texture_of("fat"),
                 keep_label=True)
    p.splenic_path = pancreas[2:] + np.array([0, -11, 2], np.float32)  # the splenic vein runs behind it
    # Adrenal glands: thin limbs above each kidney.
    for side, organ, centre in ((1, "adrenal_gland_right", (33, -28, 96)), (-1, "adrenal_gland_left", (-35, -24, 82))):
        box = canvas.box(np.array(centre) - 30, np.array(centre) + 30)
        if box is None:
            continue
        x, y, z = canvas.coords(box)
        c = jitter(centre, 3)
        limb_a = ellipsoid((x, y, z), c, (3.5, 13, 17), rotation(yaw=side * 0.6))
        limb_b = ellipsoid((x, y, z), c + np.array([side * 6, -6, -4]), (3.5, 11, 15), rotation(yaw=-side * 0.4))
        p.tissue(box, np.minimum(limb_a, limb_b), "adrenal", organ, clip=True)
    # Urinary bladder deep in the pelvis (most scans here stop above it).
    box = canvas.box((-60, -30, -260), (60, 80, -140))
    if box is not None:
        x, y, z = canvas.coords(box)
        bladder = ellipsoid((x, y, z), jitter((0, 25, -195)), grow((45, 35, 38), 0.2))
        p.tissue(box, bladder, "bowel_wall", "urinary_bladder", clip=True)
        occupancy = p.tissue(box, bladder + 3.0, "bladder_urine", "urinary_bladder", clip=True)
        if p.patient.phase == "delayed":  # excreted contrast layers at the back
            dependent = (occupancy > 0.5) & (canvas.world_y[box] < np.percentile(canvas.world_y[box][occupancy > 0.5], 40))
            canvas.ct[box][dependent] = p.patient.value("renal_pelvis")[0]


def paint_vessels(p: Painter) -> None:
    canvas, rng = p.canvas, p.patient.rng
    box = canvas.box((-90, -75, -260), (90, 60, 260))
    if box is None:
        return
    x, y, z = canvas.coords(box)
    calcified = rng.random() < 0.4
    radius = rng.uniform(9.5, 13.5)
    bifurcation = VERTEBRAE["L4"] + rng.normal(0, 8)
    aorta = vertical_tube((x, y, z), [bifurcation, 60, 150, 260], [-14, -13, -16, -20], [-20, -16, -22, -30],
                          [radius * 0.85, radius, radius * 1.05, radius * 1.1], [radius * 0.85, radius, radius * 1.05, radius * 1.1])
    p.tissue(box, aorta, "aorta", "aorta")
    if calcified:
        plaques = (np.abs(aorta + 0.5) < 1.2) & (smooth_field(rng, aorta.shape, 1.0) > 1.6)
        canvas.ct[box][plaques] = p.patient.value("calcification")[0]
    for side in (-1, 1):  # common iliac arteries and veins below the bifurcation
        iliac = vertical_tube((x, y, z), [-260, bifurcation], [side * 75, -10 + side * 4], [-10, -18], [7, 7], [7, 7])
        p.tissue(box, iliac, "artery")
        iliac_vein = vertical_tube((x, y, z), [-260, bifurcation - 10], [side * 70, 14 + side * 4], [-22, -28],
                                   [8, 9], [7, 8])
        p.tissue(box, iliac_vein, "vein")
    ivc_r = rng.uniform(10, 15)
    ivc = vertical_tube((x, y, z), [bifurcation - 10, 20, 80, 130, 180], [22, 24, 24, 20, 14], [-18, -16, -14, -6, 0],
                        [ivc_r, ivc_r, ivc_r * 1.1, ivc_r * 1.15, ivc_r * 1.2], [ivc_r * 0.6, ivc_r * 0.7, ivc_r * 0.8, ivc_r * 0.9, ivc_r])
    p.tissue(box, ivc, "inferior_vena_cava", "inferior_vena_cava")
    # Branches of the aorta (unlabelled arteries): celiac trunk, superior mesenteric, renal arteries.
    branches = [([-13, -8, 60], [-10, 12, 62], 3.5), ([-13, -6, 42], [-6, 22, 10], 3.5), ([-6, 22, 10], [-2, 28, -70], 3.0)]
    branches += [([-13, -20, 30], [-52, -32, 26], 3.0), ([-13, -20, 26], [45, -32, 14], 3.0)]
    for a, b, r in branches:
        p.tissue(box, tube((x, y, z), np.array([a, b], np.float32), np.array([r, r * 0.8], np.float32)), "artery")
    # Renal veins: the left crosses in front of the aorta to the IVC.
    for a, b in (([-50, -28, 22], [20, -12, 24]), ([46, -30, 10], [26, -16, 12])):
        p.tissue(box, tube((x, y, z), np.array([a, b], np.float32), np.array([5, 5.5], np.float32)), "vein")
    # Portal venous system: SMV up to the confluence behind the pancreatic neck, splenic vein from the spleen,
    # the portal vein obliquely up to the liver's hilum; its branches and the hepatic veins are liver.
    splenic = p.splenic_path
    portal = wobble(rng, [(6, 4, 28), (26, 4, 46), (46, 0, 66)], 2)
    smv = np.array([[10, 18, -60], [8, 14, 0], [6, 4, 28]], np.float32)
    for path, r in ((portal, rng.uniform(6, 8)), (smv, 4.5)):
        p.tissue(box, tube((x, y, z), path, np.full(len(path), r, np.float32)), "portal_vein",
                 "portal_vein_and_splenic_vein")
    if splenic is not None:
        p.tissue(box, tube((x, y, z), splenic, np.full(len(splenic), rng.uniform(4, 5.5), np.float32)),
                 "portal_vein", "portal_vein_and_splenic_vein")
    box = canvas.box((-60, -40, 50), (140, 100, 200))
    if box is None:
        return
    x, y, z = canvas.coords(box)
    liver_here = canvas.label[box] == ORGAN_IDS["liver"]
    veins = [([20, -6, 140], [90, 20, 110]), ([20, -6, 140], [40, 40, 100]), ([20, -6, 140], [-30, 40, 120]),
             ([46, 0, 66], [95, -5, 90]), ([46, 0, 66], [-10, 30, 90])]
    for a, b in veins:
        sd = tube((x, y, z), np.array([a, b], np.float32) + rng.normal(0, 4, (2, 3)).astype(np.float32),
                  np.array([5.0, 2.5], np.float32))
        sd = np.where(liver_here, sd, 1e3).astype(np.float32)
        p.tissue(box, sd, "vein" if a[2] == 140 else "portal_vein", keep_label=True)


def paint_outside(p: Painter) -> None:
    """Arms at the sides and the table under the patient, where this patient has them."""
    canvas, patient, rng = p.canvas, p.patient, p.patient.rng
    if patient.arms:
        for side in (-1, 1):
            r = rng.uniform(38, 52)
            centre = (side * (patient.body_side + rng.uniform(8, 25) + r), rng.uniform(-30, 15), 0)
            box = canvas.box((centre[0] - r * 1.3, -200, -1e4), (centre[0] + r * 1.3, 200, 1e4))
            if box is None:
                continue
            x, y, z = canvas.coords(box)
            arm = ellipsoid((x, y, z), centre, (r, r * rng.uniform(1.0, 1.25), 1e4))
            p.tissue(box, arm, "skin")
            p.tissue(box, arm + 2.0, "fat")
            p.tissue(box, arm + rng.uniform(6, 14), "muscle")
            bone_at = (centre[0] - side * rng.uniform(0, 10), centre[1] + rng.uniform(-10, 10), 0)
            bone = ellipsoid((x, y, z), bone_at, (11, 11, 1e4))
            p.tissue(box, bone, "bone_cortex")
            p.tissue(box, bone + 3.5, "bone_marrow")
    if patient.table:
        top = -(patient.body_back + rng.uniform(0, 4))
        box = canvas.box((-400, -400, -1e4), (400, top + 30, 1e4))
        if box is None:
            return
        x, y, z = canvas.coords(box)
        pad_mm, shell = rng.uniform(15, 35), rng.uniform(3, 5)
        curve = (x / 450) ** 2 * 60  # the table curves up at its sides
        pad = np.maximum(y - top - curve, -(y - (top - pad_mm) - curve))
        p.tissue(box, np.maximum(pad, np.abs(x) - 230), "pad")
        table_top = top - pad_mm
        thickness = rng.uniform(25, 40)
        slab = np.maximum(np.maximum(y - table_top - curve, -(y - (table_top - thickness) - curve)), np.abs(x) - 240)
        p.tissue(box, slab, "table_shell")
        p.tissue(box, slab + shell, "table_foam")


def scan_ct(tissue_hu: np.ndarray, texture: np.ndarray, patient: Patient, rng: np.random.Generator) -> np.ndarray:
    """CT of painted tissue values (HU) with their `texture` added: slice profile, the patient's kernel and noise."""
    ct = tissue_hu + texture
    thickness = patient.slice_mm * rng.uniform(1.0, 1.3)  # overlapping reconstruction now and then
    ct = ndimage.gaussian_filter1d(ct, 0.4 * thickness / patient.slice_mm, axis=2)
    if patient.sharp_kernel:
        blurred = ndimage.gaussian_filter(ct, (1.0, 1.0, 0))
        ct = ct + rng.uniform(0.3, 0.7) * (ct - blurred)
        noise = rng.normal(0, patient.noise_hu, ct.shape)
    else:
        ct = ndimage.gaussian_filter(ct, (0.5, 0.5, 0))
        noise = smooth_field(rng, ct.shape, (0.7, 0.7, 0)) * patient.noise_hu
    return ct + noise * np.sqrt(3.0 / patient.slice_mm)  # thinner slices, more noise


def acquire(canvas: Canvas, patient: Patient, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The scanner's view of the painted anatomy: tissue texture, slice profile, kernel and noise (CT);
    bias field and Rician noise (MR)."""
    shape = canvas.shape
    speckle = smooth_field(rng, shape, (0.8, 0.8, 0.6))
    ct = scan_ct(canvas.ct, speckle * canvas.texture, patient, rng)
    mr = canvas.mr + speckle * canvas.texture * 0.3
    mr = mr * np.exp(smooth_field(rng, shape, 20) * 0.25)
    sigma = rng.uniform(6, 14)
    mr = np.sqrt((mr + rng.normal(0, sigma, shape)) ** 2 + rng.normal(0, sigma, shape) ** 2)
    return ct, mr


def make_phantom(seed: int, phase: str | None = None, slice_mm: float | None = None,
                 pancreas: PancreasVariant = PancreasVariant()) -> Phantom:
    """One synthetic patient: CT, MR twin and schema label map, deterministic in `seed`.

    `phase` (one of `contrast.PHASES`) and `slice_mm` fix what is otherwise drawn from the seed; `pancreas` departs
    from the template's gland: its fat infiltrates the gland (labels and other tissues unchanged), its pose moves it
    (the shapes painted after it then draw differently from the seed's stream: beyond its `Patient` draws, another
    patient), its bed lays it in retroperitoneal fat."""
    if phase is not None and phase not in contrast.PHASES:
        raise ValueError(f"unknown phase {phase!r}; expected one of {contrast.PHASES}")
    rng = np.random.default_rng(seed)
    patient = Patient(rng, phase, slice_mm, pancreas)
    # The scan covers the abdomen from above the liver's dome to below the kidneys, with margins.
    z_low, z_high = -50.0 - rng.uniform(0, 30), 140.0 + rng.uniform(0, 25)
    side = int(round(rng.uniform(340, 480) / IN_PLANE_MM))  # a square field of view, as CT reconstructs
    shape = (side, side, int(np.ceil((z_high - z_low) * patient.scale[2] / patient.slice_mm)))
    spacing = (IN_PLANE_MM, IN_PLANE_MM, patient.slice_mm)
    coarse = tuple(max(2, s // 4) for s in shape)
    warp = [ndimage.zoom(smooth_field(rng, coarse, 2.0), [s / c for s, c in zip(shape, coarse)], order=1)
            * rng.uniform(3, 6) for _ in range(3)]
    z_origin = z_low * patient.scale[2]
    canvas = Canvas(shape, spacing, z_origin, patient.scale, patient.angle, patient.shift, warp)
    painter = Painter(canvas, patient)
    paint_body(painter)
    paint_bowel(painter)
    paint_stomach_and_duodenum(painter)
    paint_solid_organs(painter)
    paint_spine_and_muscles(painter)
    paint_vessels(painter)
    paint_ribs(painter)
    paint_outside(painter)
    ct, mr = acquire(canvas, patient, rng)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-(shape[0] - 1) / 2 * spacing[0], -(shape[1] - 1) / 2 * spacing[1], z_origin]
    meta = {"seed": seed, "contrast": patient.phase, "oral_contrast": patient.oral_contrast,
            "mr_sequence": patient.sequence, "slice_mm": patient.slice_mm, "scale": round(float(patient.scale.mean()), 3),
            "subcutaneous_fat_mm": round(float(patient.fat), 1), "arms_at_sides": patient.arms,
            "table": patient.table, "kernel": "sharp" if patient.sharp_kernel else "smooth",
            "noise_hu": round(float(patient.noise_hu), 1), "pancreas_fat": round(patient.pancreas_fat, 3),
            "pancreas_pose": {k: np.round(v, 2).tolist() for k, v in dataclasses.asdict(patient.pancreas_pose).items()},
            "pancreas_bed_mm": round(patient.pancreas_bed_mm, 1)}
    return Phantom(
        ct=np.clip(ct, -1024, 3071).astype(np.int16),
        mr=np.clip(mr, 0, 4000).astype(np.int16),
        label=canvas.label,
        affine=affine,
        meta=meta,
    )


def pancreas_block(label: np.ndarray, half: int = 6) -> slice:
    """The `2 * half` axial slices around the pancreas of a schema label [X, Y, Z] (the middle ones without one):
    where most abdominal organs lie together, at a fraction of a whole phantom's cost to segment."""
    z = np.nonzero((label == ORGAN_IDS["pancreas"]).any(axis=(0, 1)))[0]
    centre = int(z.mean()) if z.size else label.shape[2] // 2
    return slice(max(centre - half, 0), min(centre + half, label.shape[2]))


def save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write a NIfTI file atomically (a reader never sees half a file)."""
    with atomic_file(path, suffix=".nii.gz") as tmp:
        nib.save(nib.Nifti1Image(array, affine), tmp)


def write_sample_set(out: Path, count: int, seed: int, mr_count: int, slice_mm: float | None = None,
                     phases: list[str] | None = None, pancreas: PancreasVariant = PancreasVariant()) -> list[str]:
    """CT studies in `out/ct` (labels in `out/ct/labels/final`), MR twins in `out/mr` likewise.
    `phases`: the contrast phase of each study in turn (default: drawn from its seed); `pancreas`: see
    `make_phantom`."""
    names = []
    for i in range(count):
        phase = phases[i % len(phases)] if phases else None
        phantom = make_phantom(seed + i, phase=phase, slice_mm=slice_mm, pancreas=pancreas)
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
    parser.add_argument("--mr-count", type=int, default=2, help="how many of them also get an MR twin")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slice-mm", type=float, default=None, help="slice spacing (default: drawn per phantom)")
    parser.add_argument("--phases", default="", help=f"comma list of contrast phases to cycle through ({', '.join(contrast.PHASES)}); default: drawn")
    add_pancreas_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    phases = [s.strip() for s in args.phases.split(",") if s.strip()] or None
    write_sample_set(args.out, args.count, args.seed, args.mr_count, args.slice_mm, phases,
                     PancreasVariant.from_args(args))


if __name__ == "__main__":
    main()
