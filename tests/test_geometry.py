"""Slices go to the model's square size and back: labels must stay on the image's grid."""

from __future__ import annotations

import torch

from progidiff.geometry import from_square, to_square


def _centroid(mask: torch.Tensor) -> torch.Tensor:
    ys, xs = torch.nonzero(mask[0, 0] > 0.5, as_tuple=True)
    return torch.stack([ys.float().mean(), xs.float().mean()])


def test_a_label_resized_to_the_square_stays_on_the_image_grid():
    """A 122×101 slice (a real CT at 3 mm) goes to 128 px: the label (nearest) and the image (bilinear)
    must put an organ at the same place; plain floor-nearest moved labels by about half a pixel."""
    label = torch.zeros(1, 1, 122, 101)
    label[:, :, 30:70, 20:60] = 1
    image = label * 100.0  # an organ 100 HU brighter than its surroundings
    square_label = to_square(label, 128, mode="nearest")
    square_image = to_square(image, 128)
    assert set(square_label.unique().tolist()) == {0.0, 1.0}  # still a label map
    offset = _centroid(square_label) - _centroid(square_image / 100.0)
    assert offset.abs().max() < 0.1, offset
    back = from_square(square_label, 122, 101) >= 0.5
    assert (back != label.bool()).sum() <= 4  # the round trip returns the same pixels (corners aside)
