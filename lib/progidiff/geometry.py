"""Slices of any in-plane shape ↔ the model's square working size, without distorting anatomy.

Training and inference both go through these two functions, so the model always sees slices
padded to a square (with the slice's own background value) and resized to `size`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def to_square(images: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """[B,C,H,W] → [B,C,size,size]: pad the short side symmetrically with each slice's minimum, then resize."""
    _, _, h, w = images.shape
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    if (h, w) != (side, side):
        fill = images.amin(dim=(2, 3), keepdim=True)
        padded = fill.expand(-1, -1, side, side).clone()
        padded[:, :, top : top + h, left : left + w] = images
        images = padded
    if side == size:
        return images
    if mode == "nearest":
        # Label maps: PyTorch's plain "nearest" picks floor(i · scale), up to a pixel off the grid that
        # "bilinear" (align_corners=False) puts the image on; "nearest-exact" samples pixel centres as it does.
        return F.interpolate(images.float(), size=(size, size), mode="nearest-exact").to(images.dtype)
    return F.interpolate(images.float(), size=(size, size), mode=mode, align_corners=False).to(images.dtype)


def from_square(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of `to_square` for probabilities [B,C,size,size] → [B,C,height,width] (bilinear)."""
    side = max(height, width)
    if x.shape[-1] != side:
        x = F.interpolate(x.float(), size=(side, side), mode="bilinear", align_corners=False)
    top, left = (side - height) // 2, (side - width) // 2
    return x[..., top : top + height, left : left + width]
