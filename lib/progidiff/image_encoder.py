"""The scan encoder of the control branch: CT/MR intensities → features at the base's working size.

ControlNet's stock conditioning embedding expects an RGB edge map in [0, 1].  A CT slice is
Hounsfield units spanning −1000 … +3000, where organs differ by a few tens of HU, so the encoder
first looks at the slice through several fixed intensity windows (what a radiologist does) plus
a per-slice standardised channel (what makes MR usable), then reduces it with residual conv
stages to the resolution of the base UNet's first block.  Its last convolution is zero-initialised,
as in ControlNet, so an untrained branch adds nothing to the base.

Its organ read-out (the anatomy estimate the proposals are built around) can sit at the input size, on the
backbone's features before the stages that reduce them (`full_size_readout`, off by default: tried on
2026-12-02 for the small and thin organs a 64-px read-out loses, and worse both at the recipe's budget and at
equal steps; model/README.md, "Tried: the organ read-out at 128 px").  The features then carry those full-size
channels folded into the working size (`pixel_unshuffle`), so that one tensor per slice still serves the branch
and the read-out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets import UNet
from torch import nn

# (centre, width) in HU: soft tissue, liver/contrast, bone, lung.
DEFAULT_WINDOWS: tuple[tuple[float, float], ...] = ((40.0, 400.0), (80.0, 200.0), (400.0, 1800.0), (-600.0, 1500.0))


class IntensityWindows(nn.Module):
    """Raw intensities [B, C, H, W] → [B, C·(len(windows)+1), H, W]: each input slice (C > 1: the slice and its
    neighbours, 2.5D) through every window in [-1, 1], plus its own z-scored channel."""

    def __init__(self, windows: tuple[tuple[float, float], ...] = DEFAULT_WINDOWS, in_channels: int = 1):
        super().__init__()
        self.in_channels = in_channels
        centres = torch.tensor([c for c, _ in windows], dtype=torch.float32).view(1, -1, 1, 1)
        widths = torch.tensor([w for _, w in windows], dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("centres", centres, persistent=False)
        self.register_buffer("widths", widths, persistent=False)

    @property
    def out_channels(self) -> int:
        return self.in_channels * (self.centres.shape[1] + 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        b, c, h, w = image.shape
        x = image.float().reshape(b * c, 1, h, w)
        windowed = ((x - self.centres) / self.widths * 2.0).clamp(-1.0, 1.0)
        mean = x.mean(dim=(2, 3), keepdim=True)
        std = x.std(dim=(2, 3), keepdim=True).clamp_min(1e-3)
        standardised = ((x - mean) / std).clamp(-5.0, 5.0) / 5.0
        out = torch.cat([windowed, standardised], dim=1).reshape(b, -1, h, w)
        return out.to(image.dtype if image.is_floating_point() else x.dtype)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        groups = min(8, channels)
        self.body = nn.Sequential(
            nn.GroupNorm(groups, channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(groups, channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ScanEncoder(nn.Module):
    """Replaces `ControlNetModel.controlnet_cond_embedding`.

    `downsample` stride-2 stages take the image from its input size to the base's working size
    (0 for the compact pixel-space base, 3 for a Stable Diffusion VAE's 8× latent space).
    """

    def __init__(
        self,
        out_channels: int,
        downsample: int = 0,
        channels: tuple[int, ...] = (32, 64),
        blocks_per_stage: int = 1,
        windows: tuple[tuple[float, float], ...] = DEFAULT_WINDOWS,
        num_organs: int = 0,
        backbone_channels: tuple[int, ...] = (),
        full_size_readout: bool = False,
        in_channels: int = 1,
    ):
        """`in_channels`: axial slices per input, the slice itself and its neighbours (1 + 2 · context_slices)."""
        super().__init__()
        self.config = {
            "out_channels": out_channels,
            "downsample": downsample,
            "channels": list(channels),
            "blocks_per_stage": blocks_per_stage,
            "windows": [list(w) for w in windows],
            "num_organs": num_organs,
            "backbone_channels": list(backbone_channels),
            "full_size_readout": full_size_readout and downsample > 0,  # without a reduction it is the same read-out
            "in_channels": in_channels,
        }
        self.windows = IntensityWindows(windows, in_channels)
        # One stage per entry of `channels`; the first `downsample` stages after the first halve the size.
        channels = tuple(channels) + (channels[-1],) * max(0, downsample + 1 - len(channels))
        width = channels[0]
        if backbone_channels:
            # A MONAI UNet first: a receptive field wide enough to tell left from right kidney, spleen from liver.
            first: nn.Module = UNet(
                spatial_dims=2,
                in_channels=self.windows.out_channels,
                out_channels=width,
                channels=tuple(backbone_channels),
                strides=(2,) * (len(backbone_channels) - 1),
                num_res_units=1,
            )
        else:
            first = nn.Conv2d(self.windows.out_channels, width, 3, padding=1)
        layers: list[nn.Module] = [first]
        for stage, stage_width in enumerate(channels):
            if stage > 0:
                stride = 2 if stage <= downsample else 1
                layers.append(nn.Conv2d(width, stage_width, 3, padding=1, stride=stride))
                width = stage_width
            layers.extend(ResidualBlock(width) for _ in range(blocks_per_stage))
        layers.append(nn.SiLU())
        self.body = nn.Sequential(*layers)
        self.working_channels = width  # what the zero convolution reads
        # The layers before the first stride-2 stage run at the input size: the backbone and stage 0.
        self.full_size_layers = 1 + blocks_per_stage
        self.fold = 2 ** downsample  # input size / working size
        self.full_size_readout = self.config["full_size_readout"]
        full_size_channels = channels[0] * self.fold**2 if self.full_size_readout else 0
        self.feature_channels = width + full_size_channels
        self.conv_out = nn.Conv2d(width, out_channels, 3, padding=1)
        # One logit per organ: a deterministic "anatomy" read-out of the same features, trained with
        # Dice + BCE on every organ of the slice. Zero-initialised too, so an untrained branch stays silent.
        head_channels = channels[0] if self.full_size_readout else width
        self.organ_head = nn.Conv2d(head_channels, num_organs, 1) if num_organs else None
        for layer in (self.conv_out, self.organ_head):
            if layer is not None:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def features(self, image: torch.Tensor) -> torch.Tensor:
        """Anatomy features [B, feature_channels, h, w] at the working size, before the zero convolutions: the
        working-size features, then (with `full_size_readout`) the full-size ones folded into channels."""
        x = self.windows(image).to(self.conv_out.weight.dtype)
        if not self.full_size_readout:
            return self.body(x)
        full_size = self.body[: self.full_size_layers](x)
        working = self.body[self.full_size_layers :](full_size)
        return torch.cat([working, F.pixel_unshuffle(full_size, self.fold)], dim=1)

    def organ_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Per-organ logits [B, num_organs, s, s] from `features(image)`: at the input size with
        `full_size_readout`, else at the working size."""
        if self.organ_head is None:
            raise ValueError("this scan encoder has no organ head (num_organs=0)")
        if self.full_size_readout:
            return self.organ_head(F.pixel_shuffle(features[:, self.working_channels :], self.fold))
        return self.organ_head(features)

    def forward(self, image_or_features: torch.Tensor) -> torch.Tensor:
        """The conditioning added to the UNet's first features.

        Accepts the scan [B, in_channels, H, W] or, so that a caller computes them once, `features(scan)`.
        """
        x = image_or_features
        x = x if x.shape[1] == self.feature_channels else self.features(x)
        return self.conv_out(x[:, : self.working_channels])
