"""3D inference: a volume, slice by slice in chunks, N proposals per organ, and what they say together.

The volume arrives already in the model's frame (RAS, the model's in-plane spacing: see
`loading_transforms`); slices are sampled in chunks of `slice_batch` so memory stays bounded, and
every chunk logs its progress.  Proposal probabilities are kept as float16 ([N, P, X, Y, Z]).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from monai import transforms as mt

from .dicom_check import CheckDicomSeriesd
from .labels import ORGAN_IDS
from .pipeline import DEFAULT_PROPOSALS, DEFAULT_STEPS, ProGiDiffPipeline
from .proposals import MASK_THRESHOLD, summarise

logger = logging.getLogger(__name__)

# Organ probability from the scan encoder below which a slice is not sampled (app and CLIs' default).
DEFAULT_SCREEN_THRESHOLD = 0.05


def loading_transforms(keys: str | list[str] = "image", spacing: float | None = None, label_keys: tuple = ()) -> list:
    """MONAI transforms that bring a NIfTI/NRRD file or DICOM series folder into the model's frame
    (RAS, `spacing` mm in-plane, slice spacing kept); `label_keys` are resampled nearest-neighbour.
    A DICOM folder must hold one complete series (`CheckDicomSeriesd`)."""
    return reading_transforms(keys) + geometry_transforms(keys, spacing, label_keys)


def reading_transforms(keys: str | list[str]) -> list:
    """The reading part of `loading_transforms`: what fails here is the file's fault."""
    keys = [keys] if isinstance(keys, str) else list(keys)
    return [CheckDicomSeriesd(keys), mt.LoadImaged(keys), mt.EnsureChannelFirstd(keys)]


def geometry_transforms(keys: str | list[str], spacing: float | None = None, label_keys: tuple = ()) -> list:
    """The resampling part of `loading_transforms`: on a readable 3D image with a sound affine it cannot fail."""
    keys = [keys] if isinstance(keys, str) else list(keys)
    # "RAS" in the standard L/R, P/A, I/S labels, named so that MONAI's coming default (labels=None) changes nothing
    steps: list = [mt.Orientationd(keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))]
    if spacing:
        modes = tuple("nearest" if k in label_keys else "bilinear" for k in keys)
        steps.append(mt.Spacingd(keys, pixdim=(spacing, spacing, -1), mode=modes))
    return steps


def reading_error(error: BaseException) -> BaseException:
    """The error that says what is wrong with a file: MONAI wraps a transform's own error in
    RuntimeError("applying transform ..."), possibly several times."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


@dataclass
class VolumeProposals:
    organs: list[str]
    probabilities: torch.Tensor  # [N, P, X, Y, Z] float16
    seed: int
    steps: int
    seconds: float
    spread: float = 0.0  # organ-prior logit range the proposals were sampled over (pipeline.spread)
    encode_seconds: float = 0.0  # of `seconds`: computing the scan encoder's features (0 when they were given)

    @property
    def num_proposals(self) -> int:
        return self.probabilities.shape[0]

    def organ_probabilities(self, p: int) -> torch.Tensor:
        return self.probabilities[:, p].float()


def scan_features(pipeline: ProGiDiffPipeline, volume: torch.Tensor | np.ndarray, batch: int = 32) -> torch.Tensor:
    """The scan encoder's features of every axial slice of `volume` [X, Y, Z] ([Z, C, h, w], CPU): computed
    once, read by screening and by every organ's sampling (and cached by the app across requests)."""
    return encode_in_batches(pipeline, axial_slices(volume, pipeline.model.config.context_slices), batch)


def encode_in_batches(pipeline: ProGiDiffPipeline, slices: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """`scan_features` of slices already stacked by `axial_slices`, `batch` slices at a time."""
    return torch.cat([pipeline.encode_slices(slices[i : i + batch]).cpu() for i in range(0, slices.shape[0], batch)])


def axial_slices(volume: torch.Tensor | np.ndarray, context_slices: int = 0) -> torch.Tensor:
    """[X, Y, Z] → [Z, 1 + 2 · context_slices, X, Y] float32: each slice with its neighbours (`context_indices`)."""
    volume = torch.as_tensor(np.asarray(volume), dtype=torch.float32)
    if volume.ndim != 3:
        raise ValueError(f"a 3D volume [X, Y, Z] is needed; got shape {tuple(volume.shape)}")
    slices = volume.permute(2, 0, 1)
    depth = slices.shape[0]
    if context_slices == 0:
        return slices[:, None]
    index = torch.tensor([context_indices(z, depth, context_slices) for z in range(depth)])
    return slices[index]


def context_indices(z: int, depth: int, context_slices: int) -> list[int]:
    """Slice `z` in the middle of its `context_slices` neighbours each side, in z order (2.5D input): at the
    volume's first and last slices the edge slice stands in for the missing ones, as a scan's padding would."""
    return [min(max(z + d, 0), depth - 1) for d in range(-context_slices, context_slices + 1)]


def slices_to_sample(pipeline: ProGiDiffPipeline, features: torch.Tensor, organs: list[str], threshold: float,
                     margin: int = 1, batch: int = 32) -> dict[str, list[int]]:
    """Per organ, the indices of the slices where the scan encoder sees it (probability ≥ `threshold`, from
    the slices' `scan_features`), widened by `margin` slices each way; every slice when the model cannot
    screen (threshold ≤ 0)."""
    z = features.shape[0]
    if threshold <= 0 or not pipeline.can_screen:
        return {organ: list(range(z)) for organ in organs}
    presence = torch.cat([pipeline.organ_presence(features[i : i + batch], organs) for i in range(0, z, batch)])
    hit = presence >= threshold  # [Z, P]
    widened = hit.clone()
    for shift in range(1, margin + 1):
        widened[shift:] |= hit[:-shift]
        widened[:-shift] |= hit[shift:]
    return {organ: [int(i) for i in torch.nonzero(widened[:, p]).flatten()] for p, organ in enumerate(organs)}


def _organs_by_slices(wanted: dict[str, list[int]]) -> dict[tuple[int, ...], list[str]]:
    """Organs that need the same slices are sampled together (one batch covers all of them)."""
    groups: dict[tuple[int, ...], list[str]] = {}
    for organ, indices in wanted.items():
        groups.setdefault(tuple(indices), []).append(organ)
    return groups


def segment_volume(
    pipeline: ProGiDiffPipeline,
    volume: torch.Tensor | np.ndarray,
    organs: list[str],
    num_proposals: int = DEFAULT_PROPOSALS,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    slice_batch: int = 8,
    progress: Callable[[int, int], None] | None = None,
    screen_threshold: float = 0.0,
    features: torch.Tensor | None = None,
) -> VolumeProposals:
    """`volume` [X, Y, Z] (RAS, model spacing) → N proposals per organ for every axial slice.

    With `screen_threshold` > 0, an organ is sampled only on the slices where the scan encoder sees it
    (and their neighbours); elsewhere it is background in every proposal.  A sampled slice's proposals
    are the same either way (its noise depends on the seed, the proposal and the organ only).
    `features`: the volume's `scan_features` computed before (e.g. by an earlier request); else computed here.
    """
    start = time.time()
    slices = axial_slices(volume, pipeline.model.config.context_slices)  # [Z, 1 + 2 · context, X, Y]
    z, x, y = slices.shape[0], slices.shape[2], slices.shape[3]
    if features is None:
        features = encode_in_batches(pipeline, slices)
    encoded = time.time()
    probabilities = torch.zeros(num_proposals, len(organs), x, y, z, dtype=torch.float16)
    wanted = slices_to_sample(pipeline, features, organs, screen_threshold)
    total, done = sum(len(v) for v in wanted.values()), 0
    if total < z * len(organs):
        logger.info("screening: %s", ", ".join(f"{o} {len(v)}/{z} slices" for o, v in wanted.items()))
    for indices, group in _organs_by_slices(wanted).items():
        channels = [organs.index(o) for o in group]
        for first in range(0, len(indices), slice_batch):
            chunk = list(indices[first : first + slice_batch])
            out = pipeline(slices[chunk], group, num_proposals, steps, seed, features=features[chunk])
            for j, channel in enumerate(channels):
                probabilities[:, channel, ..., chunk] = out.probabilities[:, :, j].permute(0, 2, 3, 1).to(torch.float16)
            done += len(chunk) * len(group)
            logger.info("sampled %d/%d slice-organs (%s × %d proposals, %.1f s)", done, total, ", ".join(group),
                        num_proposals, time.time() - start)
            if progress is not None:
                progress(done, total)
    return VolumeProposals(organs, probabilities, seed, steps, time.time() - start, pipeline.spread,
                           encode_seconds=encoded - start)


def organ_statistics(proposals: VolumeProposals, voxel_ml: float) -> dict[str, dict]:
    """Per organ: proposal volumes (ml), agreement, Dice of each proposal to the consensus, uncertainty, ranking,
    whether the consensus reaches the first or last slice."""
    stats = {}
    for p, organ in enumerate(proposals.organs):
        summary = summarise(proposals.organ_probabilities(p))
        masks = proposals.organ_probabilities(p) >= MASK_THRESHOLD
        union = masks.any(dim=0)
        stats[organ] = {
            "label": ORGAN_IDS[organ],
            "consensus_volume_ml": round(float(summary.consensus.sum()) * voxel_ml, 2),
            "proposal_volumes_ml": [round(float(m.sum()) * voxel_ml, 2) for m in masks],
            "mean_pairwise_dice": round(summary.mean_pairwise_agreement, 4),
            "pairwise_dice": [[round(float(v), 4) for v in row] for row in summary.pairwise_dice],
            "dice_to_consensus": [round(float(v), 4) for v in summary.dice_to_consensus],
            "mean_uncertainty": round(float(summary.std[union].mean()) if union.any() else 0.0, 4),
            "ranking": summary.ranking,
            # in the first or last axial slice: the scan may cut the organ (its volume is then a part)
            "reaches_scan_end": bool(summary.consensus[..., 0].any() or summary.consensus[..., -1].any()),
        }
    return stats
