"""Proposals in the model's frame → label maps and probability maps in the input's geometry, a few channels
at a time.

The input can be far finer than the model's frame (0.7 mm vs 3 mm: ~18× the voxels).  Bringing every
proposal of every organ back at once would hold N·P float32 channels at full resolution; here one pass holds
at most `pass_bytes` of them, and each pass is reduced at once to what is kept (a uint8 label map, or one
float map).  Fewer, larger passes are faster (each pass builds its own sampling grid), so a small input
goes back in one pass and a large one in several.

When the model's frame lies on the input's axes (reorientation and a zoom per axis: what `loading_transforms`
does to any scan, oblique ones included, since MONAI's Spacing keeps the scan's directions) the way back is
separable: linear interpolation along one axis after the other (`SeparableInverse`), the same values as
MONAI's inverse (trilinear, border padding) at a fraction of its time and memory; frames that do not share
their axes (other transforms) go back through MONAI's inverse.
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
    probability: np.ndarray  # float16 (the proposals' own precision): the most likely organ's consensus probability
    uncertainty: np.ndarray  # float16: the largest per-organ std over the proposals
    affine: np.ndarray


def monai_inverter(image: MetaTensor, transform: mt.Compose, key: str) -> Invert:
    """MONAI's inverse of `transform` as `image` records it (any affine)."""

    def invert(channels: torch.Tensor) -> MetaTensor:
        out = MetaTensor(channels.float(), affine=image.affine, meta=copy.deepcopy(image.meta))
        out.applied_operations = copy.deepcopy(image.applied_operations)
        return transform.inverse({key: out})[key]

    return invert


@dataclass
class SeparableInverse:
    """The input's voxel grid read off the model's frame axis by axis: input axis `a` is model axis `axes[a]`,
    input index j lies at model index `scales[a]·j + offsets[a]` (voxel centres), out-of-frame indices take
    the nearest border value (MONAI's border padding)."""

    axes: tuple[int, int, int]
    scales: tuple[float, float, float]
    offsets: tuple[float, float, float]
    shape: tuple[int, int, int]  # the input's
    affine: np.ndarray  # the input's

    @classmethod
    def between(cls, image: MetaTensor, tolerance: float = 1e-4) -> "SeparableInverse | None":
        """From `image`'s affine (model frame) and its `original_affine` (as read); None if the axes are not shared."""
        original = image.meta.get("original_affine")
        shape = image.meta.get("spatial_shape")
        if original is None or shape is None:
            return None
        original = np.asarray(original, dtype=np.float64)
        to_model = np.linalg.inv(np.asarray(image.affine, dtype=np.float64)) @ original
        rotation, axes, scales = to_model[:3, :3], [], []
        for a in range(3):
            column = rotation[:, a]
            m = int(np.argmax(np.abs(column)))
            if np.abs(np.delete(column, m)).max() > tolerance * abs(column[m]):
                return None  # oblique: no axis of the model's frame is this input axis
            axes.append(m)
            scales.append(float(column[m]))
        if sorted(axes) != [0, 1, 2]:
            return None
        return cls(tuple(axes), tuple(scales), tuple(float(to_model[m, 3]) for m in axes),
                   tuple(int(v) for v in np.asarray(shape).ravel()[:3]), original)

    def __call__(self, channels: torch.Tensor) -> MetaTensor:
        """[C, X, Y, Z] in the model's frame → [C, *shape] on the input's grid."""
        frame = tuple(channels.shape[1:])
        _, values = self.region(channels, tuple((0, size - 1) for size in frame), frame)
        return MetaTensor(values, affine=torch.as_tensor(self.affine))

    def region(self, boxed: torch.Tensor, box: tuple[tuple[int, int], ...],
               frame: tuple[int, ...]) -> tuple[tuple[slice, ...], torch.Tensor]:
        """Only the input voxels that read `box` (inclusive model indices per model axis) of a model frame of shape
        `frame`, whose values there are `boxed` [C, ...]: (their slices on the input's grid, values [C, ...]).
        Values outside the box must be 0, except at the frame's border, which extends to every input voxel
        beyond it (border padding)."""
        out = boxed.float()
        ranges = [self._input_range(a, *box[self.axes[a]], frame[self.axes[a]]) for a in range(3)]
        if any(len(r) == 0 for r in ranges):
            return tuple(slice(0, 0) for _ in range(3)), out.new_zeros((out.shape[0], 0, 0, 0))
        # Shrinking axes first: the tensor grows only at the last steps.
        for a in sorted(range(3), key=lambda a: abs(self.scales[a])):
            out = self._along(out, 1 + self.axes[a], a, ranges[a], box[self.axes[a]][0])
        # out's axis 1 + axes[a] now holds input axis a: put them in the input's order.
        order = tuple(1 + self.axes[a] for a in range(3))
        if order != (1, 2, 3):
            out = out.permute(0, *order).contiguous()
        return tuple(slice(int(r[0]), int(r[-1]) + 1) for r in ranges), out

    def _input_range(self, a: int, lo: int, hi: int, size: int) -> torch.Tensor:
        """Input indices along axis `a` whose model coordinate reads [lo, hi] (unbounded on a side at the frame's edge)."""
        where = torch.arange(self.shape[a], dtype=torch.float64) * self.scales[a] + self.offsets[a]
        inside = torch.ones_like(where, dtype=torch.bool)
        if lo > 0:
            inside &= where >= lo - 1e-6
        if hi < size - 1:
            inside &= where <= hi + 1e-6
        return torch.nonzero(inside).flatten()  # contiguous: the coordinate is monotonic in the index

    def _along(self, tensor: torch.Tensor, dim: int, a: int, indices: torch.Tensor, start: int) -> torch.Tensor:
        size = tensor.shape[dim]
        where = (indices.double() * self.scales[a] + self.offsets[a] - start).clamp(0, size - 1)
        low = where.floor().long()
        weight = (where - low).float()
        high = (low + 1).clamp(max=size - 1)
        if bool((weight.abs() < 1e-6).all()):
            return tensor.index_select(dim, low)  # lies on the model's voxels: a gather (z kept, flips)
        view = [1] * tensor.ndim
        view[dim] = -1
        low_values = tensor.index_select(dim, low)
        return low_values.add_(tensor.index_select(dim, high).sub_(low_values).mul_(weight.view(view)))


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
                           pass_bytes: int = PASS_BYTES, separable_if_possible: bool = True) -> InputGeometryMaps:
    """Consensus, each proposal, probability and uncertainty in the input's geometry (see module doc), undoing
    the transforms that brought the input into the model's frame as `image` under `key` (separably if possible
    and `separable_if_possible`: the benchmark measures MONAI's inverse too)."""
    separable = SeparableInverse.between(image) if separable_if_possible else None
    if separable is not None:
        return _maps_organ_by_organ(proposals, separable)
    each = proposals.probabilities  # [N, P, X, Y, Z] float16, model frame
    organs, count = proposals.organs, len(proposals.organs)
    invert = monai_inverter(image, transform, key)
    per_pass = channels_per_pass(input_voxels(image), pass_bytes)
    best, index, affine = _most_likely(lambda s: each[:, s].float().mean(0), count, invert, per_pass)
    consensus, probability = _label_map(best, index, organs), best.numpy().astype(np.float16)
    del best, index
    spread, _, _ = _most_likely(lambda s: each[:, s].float().std(0, unbiased=False), count, invert, per_pass)
    maps = []
    for k in range(each.shape[0]):
        best, index, _ = _most_likely(lambda s, k=k: each[k, s].float(), count, invert, per_pass)
        maps.append(_label_map(best, index, organs))
    return InputGeometryMaps(consensus, maps, probability, spread.numpy().astype(np.float16), affine)


def _maps_organ_by_organ(proposals: VolumeProposals, separable: SeparableInverse) -> InputGeometryMaps:
    """`maps_in_input_geometry` the separable way, each organ over the input voxels near where it is found
    (a probability under `NEGLIGIBLE` is 0 there): an abdomen's organs cover a fraction of the scan each."""
    each = proposals.probabilities  # [N, P, X, Y, Z] float16, model frame
    boxes = [_found_in(each[:, p]) for p in range(each.shape[1])]
    consensus, probability = _winner(lambda x: x.mean(0), each, proposals.organs, separable, boxes)
    probability = probability.half()  # kept at the proposals' precision: half the memory of the largest maps
    uncertainty = _winner(lambda x: (x - x.mean(0)).square_().mean(0).sqrt_(), each, proposals.organs, separable,
                          boxes)[1].half()
    maps = [_winner(lambda x, k=k: x[k], each, proposals.organs, separable, boxes)[0].numpy()
            for k in range(each.shape[0])]
    return InputGeometryMaps(consensus.numpy(), maps, probability.numpy(), uncertainty.numpy(), separable.affine)


NEGLIGIBLE = 1 / 256  # probabilities under this count as 0 when bounding where an organ is found


def _found_in(organ: torch.Tensor) -> tuple[tuple[int, int], ...] | None:
    """The box (inclusive model indices) holding every probability ≥ `NEGLIGIBLE` of `organ` [N, X, Y, Z], one
    zero voxel wider each way (within the frame); None when it is nowhere."""
    found = organ.amax(0) >= NEGLIGIBLE
    if not bool(found.any()):
        return None
    box = []
    for axis in range(3):
        hit = torch.nonzero(found.any(dim=tuple(d for d in range(3) if d != axis))).flatten()
        box.append((max(int(hit[0]) - 1, 0), min(int(hit[-1]) + 1, found.shape[axis] - 1)))
    return tuple(box)


def _winner(reduce: Callable[[torch.Tensor], torch.Tensor], each: torch.Tensor, organs: list[str],
            separable: SeparableInverse, boxes: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Over the organs, of `reduce` (proposals [N, ...] → one map) of each organ's proposals on the input's grid:
    (label map of the largest value if ≥ the threshold, the largest value); ties keep the earlier organ, as one
    argmax over all channels would."""
    best = torch.zeros(separable.shape)
    label = torch.zeros(separable.shape, dtype=torch.uint8)
    frame = tuple(each.shape[2:])
    for p, organ in enumerate(organs):
        if boxes[p] is None:
            continue
        model_frame = reduce(each[(slice(None), p, *(slice(lo, hi + 1) for lo, hi in boxes[p]))].float())
        where, values = separable.region(model_frame.masked_fill(model_frame < NEGLIGIBLE, 0)[None], boxes[p], frame)
        values, best_there, label_there = values[0], best[where], label[where]  # views: updated in place
        label_there.masked_fill_(values > best_there, ORGAN_IDS[organ])
        torch.maximum(best_there, values, out=best_there)
        del values
    label.masked_fill_(best < MASK_THRESHOLD, 0)
    return label, best


def stored(array: np.ndarray) -> np.ndarray:
    """What a map is written as: NIfTI has no float16, so the float maps go to disk as float32."""
    return array.astype(np.float32) if array.dtype == np.float16 else array


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
