"""Shared by the `segment` and `evaluate` CLIs: load a model folder (ProGiDiff or baseline), bring a
NIfTI file or DICOM series into the model's frame with MONAI, sample, and map results back."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from monai import transforms as mt
from monai.data import MetaTensor

from .baseline import BaselineSegmenter, is_baseline_folder
from .pipeline import DEFAULT_SCHEDULER, ProGiDiffPipeline
from .volume import VolumeProposals, axial_slices, loading_transforms, reading_error, segment_volume


class Predictor:
    """One interface over both kinds of model folder: `segment(volume, organs, ...) -> VolumeProposals`."""

    def __init__(self, model_dir: str | Path, scheduler: str = DEFAULT_SCHEDULER, device: str | None = None,
                 screen_threshold: float = 0.0, slice_batch: int = 8, spread: float | None = None):
        self.model_dir = Path(model_dir)
        self.screen_threshold = screen_threshold
        self.slice_batch = slice_batch
        if is_baseline_folder(self.model_dir):
            self.baseline: BaselineSegmenter | None = BaselineSegmenter.from_pretrained(self.model_dir)
            self.pipeline = None
            self.spacing_mm = self.baseline.config.spacing_mm
            self.organs = list(self.baseline.config.organs)
        else:
            self.baseline = None
            self.pipeline = ProGiDiffPipeline.from_pretrained(self.model_dir, scheduler=scheduler, device=device,
                                                              show_progress=False, spread=spread)
            self.spacing_mm = self.pipeline.model.config.spacing_mm
            self.organs = list(self.pipeline.model.config.organs)

    @property
    def kind(self) -> str:
        return "baseline" if self.baseline is not None else "progidiff"

    @property
    def context_slices(self) -> int:
        """Neighbouring slices each side the model reads with every slice (2.5D input; 0 for the baseline)."""
        return self.pipeline.model.config.context_slices if self.pipeline is not None else 0

    def segment(self, volume: torch.Tensor, organs: list[str], proposals: int, steps: int, seed: int) -> VolumeProposals:
        if self.pipeline is not None:
            return segment_volume(self.pipeline, volume, organs, proposals, steps, seed, slice_batch=self.slice_batch,
                                  screen_threshold=self.screen_threshold)
        start = time.time()
        slices = axial_slices(volume)
        probability = self.baseline.predict(slices, organs)  # [1, Z, P, X, Y]
        probability = probability.permute(0, 2, 3, 4, 1).to(torch.float16)  # [1, P, X, Y, Z]
        return VolumeProposals(organs, probability, seed, 1, time.time() - start)


@dataclass
class LoadedVolume:
    """A scan in the model's frame, with what is needed to map outputs back to the file's geometry."""

    data: dict
    transform: mt.Compose

    @property
    def image(self) -> MetaTensor:
        return self.data["image"]

    @property
    def voxel_spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in self.image.pixdim[:3])


def load_volume(path: str | Path, spacing_mm: float, label: str | Path | None = None) -> LoadedVolume:
    """Read with MONAI (NIfTI, NRRD or a DICOM series folder) into RAS at the model's in-plane spacing."""
    keys = ["image"] + (["label"] if label is not None else [])
    transform = mt.Compose(loading_transforms(keys, spacing_mm, label_keys=("label",)))
    data = {"image": str(path)} | ({"label": str(label)} if label is not None else {})
    try:
        return LoadedVolume(transform(data), transform)
    except RuntimeError as error:
        cause = reading_error(error)
        raise ValueError(f"could not read {path}: {cause}") from cause

