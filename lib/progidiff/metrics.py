"""Segmentation metrics on boolean masks: Dice and the 95th-percentile Hausdorff distance (mm)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage


def dice(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Dice of two boolean masks; two empty masks agree perfectly (1.0)."""
    a = torch.as_tensor(a).bool()
    b = torch.as_tensor(b).bool()
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return 1.0
    return 2.0 * int((a & b).sum()) / total


def _surface_distances(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Distances (mm) from the surface voxels of `a` to the surface of `b`."""
    surface_a = a & ~ndimage.binary_erosion(a)
    surface_b = b & ~ndimage.binary_erosion(b)
    distance_to_b = ndimage.distance_transform_edt(~surface_b, sampling=spacing)
    return distance_to_b[surface_a]


def hd95(a: np.ndarray, b: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """Symmetric 95th-percentile Hausdorff distance in mm; NaN when either mask is empty."""
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    if not a.any() or not b.any():
        return float("nan")
    spacing = tuple(spacing) if spacing is not None else (1.0,) * a.ndim
    distances = np.concatenate([_surface_distances(a, b, spacing), _surface_distances(b, a, spacing)])
    return float(np.percentile(distances, 95))
