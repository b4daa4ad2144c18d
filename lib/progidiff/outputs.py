"""Proposals in the model's frame → label maps and probability maps in the input's geometry, a few channels
at a time.

The input can be far finer than the model's frame (0.7 mm vs 3 mm: ~18× the voxels).  Bringing every
proposal of every organ back at once would hold N·P float32 channels at full resolution; here one pass holds
at most `pass_bytes` of them, and each pass is reduced at once to what is kept (a uint8 label map, or one
float map).  Fewer, larger passes are faster (each pass builds its own sampling grid), so a small input
goes back in one pass and a large one in several.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from monai import transforms as mt
from monai.data import MetaTensor

from .labels import ORGAN_IDS, proposal_segment_name
from .proposals import MASK_THRESHOLD
from .terminology import organ_rgb
from .volume import VolumeProposals

Invert = Callable[[torch.Tensor], MetaTensor]
PASS_BYTES = 2**30  # float32 channels at full resolution in one pass, counted twice (the resampler's copy)
KEPT_BYTES_PER_VOXEL = 1 + 2 * 4 + (4 + 1 + 8)  # consensus, probability + uncertainty, running max + its argmax


@dataclass
class InputGeometryMaps:
    """What a user gets back, on the input's voxel grid (`affine`)."""

    consensus: np.ndarray  # uint8 schema values: per voxel the most likely organ if its mean probability ≥ 0.5
    proposals: list[np.ndarray]  # uint8 schema values, one map per proposal
    probability: np.ndarray  # float32: the most likely organ's consensus probability
    uncertainty: np.ndarray  # float32: the largest per-organ std over the proposals
    affine: np.ndarray


def inverter(image: MetaTensor, transform: mt.Compose, key: str) -> Invert:
    """A function taking channels [C, X, Y, Z] in the model's frame (the frame of `image`, which `transform`
    made under `key`) back to the input's geometry, by undoing the transforms `image` records."""

    def invert(channels: torch.Tensor) -> MetaTensor:
        out = MetaTensor(channels.float(), affine=image.affine, meta=copy.deepcopy(image.meta))
        out.applied_operations = copy.deepcopy(image.applied_operations)
        return transform.inverse({key: out})[key]

    return invert


def _most_likely(channels: Callable[[slice], torch.Tensor], count: int, invert: Invert,
                 per_pass: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Over `count` channels brought back `per_pass` at a time: (largest value, its channel, affine)."""
    best = index = affine = None
    for first in range(0, count, per_pass):
        part = invert(channels(slice(first, first + per_pass)))
        affine = np.asarray(part.affine, dtype=np.float64)
        value, which = part.as_tensor().max(dim=0)
        which = (which + first).to(torch.uint8)
        if best is None:
            best, index = value, which
        else:
            better = value > best  # ties keep the earlier organ, as one argmax over all channels would
            best, index = torch.where(better, value, best), torch.where(better, which, index)
        del part
    return best, index, affine


def _label_map(best: torch.Tensor, index: torch.Tensor, organs: list[str]) -> np.ndarray:
    values = torch.tensor([ORGAN_IDS[o] for o in organs], dtype=torch.uint8)
    return torch.where(best >= MASK_THRESHOLD, values[index.long()], torch.zeros((), dtype=torch.uint8)).numpy()


def input_voxels(image: MetaTensor) -> int:
    """Voxels of the input `image` was made from (its shape as read)."""
    return int(np.prod(image.meta.get("spatial_shape", image.shape[1:])))


def channels_per_pass(input_voxels: int, pass_bytes: int = PASS_BYTES) -> int:
    return max(1, pass_bytes // (2 * 4 * input_voxels))


def bytes_needed(num_proposals: int, num_organs: int, input_voxels: int, pass_bytes: int = PASS_BYTES) -> int:
    """Peak bytes at full resolution of `maps_in_input_geometry`: the maps it keeps (one uint8 per proposal
    besides) and one pass."""
    one_pass = 2 * 4 * min(channels_per_pass(input_voxels, pass_bytes), num_organs) * input_voxels
    return (KEPT_BYTES_PER_VOXEL + num_proposals) * input_voxels + one_pass


def maps_in_input_geometry(proposals: VolumeProposals, image: MetaTensor, transform: mt.Compose, key: str = "image",
                           pass_bytes: int = PASS_BYTES) -> InputGeometryMaps:
    """Consensus, each proposal, probability and uncertainty in the input's geometry (see module doc), undoing
    the transforms that brought the input into the model's frame as `image` under `key`."""
    each = proposals.probabilities  # [N, P, X, Y, Z] float16, model frame
    organs, count = proposals.organs, len(proposals.organs)
    invert = inverter(image, transform, key)
    per_pass = channels_per_pass(input_voxels(image), pass_bytes)
    best, index, affine = _most_likely(lambda s: each[:, s].float().mean(0), count, invert, per_pass)
    consensus, probability = _label_map(best, index, organs), best.numpy().astype(np.float32)
    del best, index
    spread, _, _ = _most_likely(lambda s: each[:, s].float().std(0, unbiased=False), count, invert, per_pass)
    maps = []
    for k in range(each.shape[0]):
        best, index, _ = _most_likely(lambda s, k=k: each[k, s].float(), count, invert, per_pass)
        maps.append(_label_map(best, index, organs))
    return InputGeometryMaps(consensus, maps, probability, spread.numpy().astype(np.float32), affine)


def renumber(label_map: np.ndarray, values: dict[str, int]) -> np.ndarray:
    """A schema label map with each organ of `values` renumbered to its value there (others become 0)."""
    lookup = np.zeros(256, dtype=np.uint8)
    for organ, value in values.items():
        lookup[ORGAN_IDS[organ]] = value
    return lookup[label_map]


def proposal_layers(maps: InputGeometryMaps, organs: list[str]) -> tuple[np.ndarray, list[str], dict[str, list[float]]]:
    """Per organ its consensus and every proposal as binary layers [C, X, Y, Z] (uint8) that may overlap, with
    their segment names ("liver", "liver - proposal 1 of 5", ...: tightest first) and display colours (0..1)."""
    n = len(maps.proposals)
    layers, names, colours = [], [], {}
    for organ in organs:
        value = ORGAN_IDS[organ]
        rgb = [c / 255 for c in organ_rgb(organ)]
        organ_maps = [(organ, maps.consensus)] + [(proposal_segment_name(organ, k, n), m) for k, m in enumerate(maps.proposals)]
        for name, label_map in organ_maps:
            layers.append((label_map == value).astype(np.uint8))
            names.append(name)
            colours[name] = rgb
    return np.stack(layers), names, colours
