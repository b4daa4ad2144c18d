"""Training data: 3D volumes → augmented 2D axial slices, each with one organ prompt and its mask.

Volumes are read with MONAI (LoadImage → channel first → RAS orientation → in-plane spacing), their
labels mapped into the schema by organ name, and kept in memory (they are small at 3 mm).  A
sample is a random slice, a random organ phrase (a synonym half of the time, an organ *absent*
from the slice a quarter of the time, whose target is an empty mask) and MONAI 2D augmentation.
No left-right flips: they would swap "left kidney" and "right kidney".  A slice of a real non-contrast CT
is moved to a random contrast phase a share of the time (`progidiff.contrast.simulate_phase`), so that
the one real patient is also seen the way users' enhanced scans show anatomy.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import random
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai import transforms as mt

from . import contrast
from .geometry import to_square
from .intensity import PercentileNormalisation
from .labels import ORGAN_IDS, load_class_map, organs_present, to_schema
from .phantoms import PancreasVariant, make_phantom
from .prompts import ORGAN_SYNONYMS, organ_text
from .volume import context_indices, loading_transforms

@dataclass
class Volume:
    """An image [X, Y, Z] (RAS, float32) and its schema label map, with where it came from."""

    image: np.ndarray
    label: np.ndarray
    name: str
    spacing: tuple[float, float, float]
    unenhanced_ct: bool = False  # a real non-contrast CT in HU: its slices may be moved to other phases

    def slice_organs(self, z: int) -> list[str]:
        return organs_present(self.label[:, :, z], min_voxels=4)


def load_volume_pair(
    image_path: str | Path,
    label_path: str | Path,
    label_map: str | dict[int, str] = "schema",
    spacing: float | None = None,
) -> Volume:
    """Read image + label through MONAI (RAS, optional in-plane resampling) and map the label by name.

    `label_map`: "schema", "total", "total_mr", a JSON file, or an id → name dict.  A volume whose labelled
    aorta reads as non-contrast CT is marked `unenhanced_ct` (`contrast.is_unenhanced`).
    """
    steps = loading_transforms(["image", "label"], spacing, label_keys=("label",))
    data = mt.Compose(steps)({"image": str(image_path), "label": str(label_path)})
    image = np.asarray(data["image"][0], dtype=np.float32)
    label = np.asarray(data["label"][0]).astype(np.int64)
    if isinstance(label_map, dict):
        label = to_schema(label, label_map)
    elif label_map != "schema":
        label = to_schema(label, load_class_map(label_map, Path(label_path)))
    pixdim = tuple(float(v) for v in data["image"].pixdim[:3])
    return Volume(image=image, label=label.astype(np.uint8), name=Path(image_path).name, spacing=pixdim,
                  unenhanced_ct=contrast.is_unenhanced(image, label, ORGAN_IDS["aorta"]))


def normalised(volume: Volume, normalisation: PercentileNormalisation | None) -> Volume:
    """The volume rescaled as `normalisation` says (None: as it is, e.g. CT in HU)."""
    if normalisation is None:
        return volume
    return dataclasses.replace(volume, image=normalisation(volume.image))


def phantom_volume(seed: int, modality: str = "ct", phase: str | None = None,
                   pancreas: PancreasVariant = PancreasVariant()) -> Volume:
    p = make_phantom(seed, phase=phase, pancreas=pancreas)
    image = (p.ct if modality == "ct" else p.mr).astype(np.float32)
    return Volume(image, p.label, f"phantom_{seed}", tuple(np.diag(p.affine)[:3]))


def phantom_volumes(count: int, seed: int, modality: str = "ct", phases: list[str] | None = None,
                    workers: int = 1, pancreas: PancreasVariant = PancreasVariant()) -> list[Volume]:
    """`count` phantoms from `seed` on; `phases`: each one's contrast phase in turn (default: drawn).
    `workers` > 1 makes them in that many processes (a phantom takes 1-3 s; the same volumes either way).
    `pancreas`: see `make_phantom`."""
    jobs = [(seed + i, modality, phases[i % len(phases)] if phases else None, pancreas) for i in range(count)]
    if workers <= 1 or count < 2 * workers:
        return [phantom_volume(*job) for job in jobs]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        return pool.starmap(phantom_volume, jobs, chunksize=4)


def split_slices(volume: Volume, held_out: Collection[int]) -> tuple[list[Volume], list[Volume]]:
    """(training runs, held-out runs) of one volume: a block, so neighbours of a test slice never train.
    Both sides come as one volume per contiguous run of z-slices, so that a slice's neighbours (2.5D input)
    are its own and never the slice beyond the other side's block."""
    depth = volume.image.shape[2]

    def runs_of(zs: list[int], tag: str) -> list[Volume]:
        breaks = np.flatnonzero(np.diff(zs) > 1) + 1
        runs = [run.tolist() for run in np.split(np.array(zs, dtype=int), breaks) if len(run)]
        return [dataclasses.replace(volume, image=volume.image[:, :, run], label=volume.label[:, :, run],
                                    name=f"{volume.name}[{tag} {run[0]}-{run[-1]}]") for run in runs]

    return (runs_of([z for z in range(depth) if z not in held_out], "train"),
            runs_of([z for z in range(depth) if z in held_out], "held-out"))


def augmentation(image_size: int, bias_field: bool = False) -> mt.Compose:
    """Mild geometry and wide intensity changes (contrast phases, scanners), applied to [1, S, S] slices.
    `bias_field`: also MR's smooth multiplicative shading (coil sensitivity), so that an MR model tolerates it."""
    keys = ["image", "label"]
    shading = [mt.RandBiasFieldd("image", degree=3, coeff_range=(0.0, 0.1), prob=0.5)] if bias_field else []
    return mt.Compose(
        [
            *shading,
            mt.RandAffined(
                keys,
                prob=0.8,
                rotate_range=0.2,
                scale_range=0.15,
                translate_range=(image_size * 0.08, image_size * 0.08),
                mode=("bilinear", "nearest"),
                padding_mode="border",
            ),
            mt.RandShiftIntensityd("image", offsets=40.0, prob=0.5),
            mt.RandScaleIntensityd("image", factors=0.1, prob=0.5),
            mt.RandGaussianSmoothd("image", prob=0.2, sigma_x=(0.3, 1.0), sigma_y=(0.3, 1.0)),
            mt.RandGaussianNoised("image", prob=0.5, std=12.0),
        ]
    )


def prompt_phrase(organ: str, rng: random.Random) -> str:
    """The organ's natural text, or half of the time one of its synonyms (multi-word ones included)."""
    if rng.random() < 0.5:
        return organ_text(organ)
    return rng.choice((organ.replace("_", " "), *ORGAN_SYNONYMS[organ]))


class SliceDataset(torch.utils.data.Dataset):
    """Endless random (slice, prompt, mask) samples from weighted groups of volumes."""

    def __init__(
        self,
        groups: list[tuple[list[Volume], float]],
        image_size: int,
        organs: list[str],
        negative_rate: float = 0.25,
        augment: bool = True,
        length: int = 10**9,
        seed: int = 0,
        bias_field: bool = False,
        contrast_rate: float = 0.0,
        context_slices: int = 0,
        fat_aware_contrast: bool = False,
    ):
        """`contrast_rate`: share of the samples from `unenhanced_ct` volumes moved to an enhanced phase;
        `fat_aware_contrast`: fat in their organs stays as it reads (`contrast.simulate_phase(spare_fat=)`).
        `context_slices`: neighbours each side stacked with the slice as channels (2.5D, `volume.axial_slices`)."""
        self.context_slices = context_slices
        self.groups = [(volumes, weight) for volumes, weight in groups if volumes]
        self.contrast_rate = contrast_rate
        self.fat_aware_contrast = fat_aware_contrast
        self.image_size = image_size
        self.organs = organs
        self.negative_rate = negative_rate
        self.transform = augmentation(image_size, bias_field) if augment else None
        self.length = length
        self.reseed(seed)
        # Slices that hold at least one organ of interest, per group.
        self.slices = [
            [(v, z) for v in volumes for z in range(v.image.shape[2]) if set(v.slice_organs(z)) & set(organs)]
            for volumes, _ in self.groups
        ]

    def reseed(self, seed: int) -> None:
        """Start another random stream of samples (each process of a distributed run draws its own)."""
        self.rng = random.Random(seed)
        if self.transform is not None:
            self.transform.set_random_state(seed)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        group = self.rng.choices(range(len(self.groups)), weights=[w for _, w in self.groups])[0]
        volume, z = self.rng.choice(self.slices[group])
        present = [o for o in volume.slice_organs(z) if o in self.organs]
        in_slice = set(np.unique(volume.label[:, :, z]).tolist())
        absent = [o for o in self.organs if ORGAN_IDS[o] not in in_slice]
        negative = bool(absent) and self.rng.random() < self.negative_rate
        organ = self.rng.choice(absent if negative else present)
        stack = context_indices(z, volume.image.shape[2], self.context_slices)
        images = [volume.image[:, :, i] for i in stack]
        if volume.unenhanced_ct and self.rng.random() < self.contrast_rate:
            phase = self.rng.choice(contrast.PHASES[1:])
            seed = self.rng.getrandbits(32)  # one draw of the phase's HU for the slice and its neighbours
            images = [contrast.simulate_phase(image, volume.label[:, :, i], ORGAN_IDS, phase,
                                              np.random.default_rng(seed), volume.spacing[0],
                                              spare_fat=self.fat_aware_contrast)
                      for image, i in zip(images, stack)]
        image = torch.from_numpy(np.ascontiguousarray(np.stack(images), dtype=np.float32)[None])
        label = torch.from_numpy(volume.label[None, None, :, :, z].astype(np.float32))
        image = to_square(image, self.image_size)[0]
        label = to_square(label, self.image_size, mode="nearest")[0]
        if self.transform is not None:
            out = self.transform({"image": image, "label": label})
            image, label = torch.as_tensor(out["image"]), torch.as_tensor(out["label"])
        label = label.round().long()
        return {
            "image": image.float(),
            "mask": (label == ORGAN_IDS[organ]).float(),
            "label": label,
            "text": prompt_phrase(organ, self.rng),
            "organ": organ,
        }
