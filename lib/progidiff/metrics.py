"""Segmentation metrics on boolean masks, through `monai.metrics`: Dice, the 95th-percentile Hausdorff distance
(mm), and what an annotator needs from a set of proposals: whether they bracket the reference, and their
generalized energy distance to it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou


def _batch(mask: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A boolean mask of any shape → MONAI's [batch 1, channel 1, ...] float layout."""
    return torch.as_tensor(np.asarray(mask) if isinstance(mask, np.ndarray) else mask).bool()[None, None].float()


def dice(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Dice of two boolean masks; two empty masks agree perfectly (1.0)."""
    a, b = _batch(a), _batch(b)
    if not a.any() and not b.any():
        return 1.0
    return float(compute_dice(a, b, include_background=True, ignore_empty=False))


def hd95(a: np.ndarray, b: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """Symmetric 95th-percentile Hausdorff distance in mm (MONAI's: the larger of the two directed ones); NaN
    when either mask is empty."""
    a, b = _batch(a), _batch(b)
    if not a.any() or not b.any():
        return float("nan")
    spacing = list(spacing) if spacing is not None else None
    return float(compute_hausdorff_distance(a, b, include_background=True, percentile=95, spacing=spacing))


def bracketing(proposals: torch.Tensor | np.ndarray, reference: torch.Tensor | np.ndarray) -> dict[str, float]:
    """Do the proposals [N, ...] bracket the reference?  `inside_generous`: the share of the reference inside the
    most generous (largest) proposal; `tightest_inside`: the share of the tightest (smallest) proposal inside the
    reference.  Both near 1: the truth lies between the tightest and the most generous answer."""
    masks = torch.as_tensor(np.asarray(proposals)).bool().flatten(1)
    truth = torch.as_tensor(np.asarray(reference)).bool().flatten()
    sizes = masks.sum(dim=1)
    generous, tightest = masks[int(sizes.argmax())], masks[int(sizes.argmin())]
    inside_generous = float((generous & truth).sum() / truth.sum()) if truth.any() else 1.0
    tightest_inside = float((tightest & truth).sum() / tightest.sum()) if tightest.any() else 1.0
    return {"inside_generous": inside_generous, "tightest_inside": tightest_inside}


def generalized_energy_distance(proposals: torch.Tensor | np.ndarray, reference: torch.Tensor | np.ndarray) -> float:
    """GED² with d = 1 − IoU (MONAI's IoU, two empty masks agreeing): 2·E[d(proposal, reference)] −
    E[d(proposal, proposal′)] − E[d(reference, reference′)], the last 0 with one reference.  Low: the proposals
    lie around the reference and differ from each other as much as they err."""
    masks = [_batch(m) for m in torch.as_tensor(np.asarray(proposals)).bool()]
    truth = _batch(reference)

    def distance(x: torch.Tensor, y: torch.Tensor) -> float:
        if not x.any() and not y.any():
            return 0.0
        return 1.0 - float(compute_iou(x, y, include_background=True, ignore_empty=False))

    to_reference = np.mean([distance(m, truth) for m in masks])
    between = np.mean([distance(x, y) for i, x in enumerate(masks) for j, y in enumerate(masks) if i != j]) \
        if len(masks) > 1 else 0.0
    return float(2 * to_reference - between)
