"""The deterministic baseline: a MONAI 2D UNet on the same windows, data and budget as the diffusion model.

It predicts every schema organ at once (one sigmoid channel each), so one forward answers any prompt.
Its model folder holds `baseline_config.json` + `model.safetensors`; evaluate/segment accept it like a
ProGiDiff folder and report it as a single "proposal".
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from monai.networks.nets import UNet
from safetensors.torch import load_file, save_file
from torch import nn

from .geometry import from_square, to_square
from .image_encoder import DEFAULT_WINDOWS, IntensityWindows
from .io_utils import atomic_directory
from .labels import ORGAN_IDS

BASELINE_CONFIG = "baseline_config.json"


@dataclass
class BaselineConfig:
    image_size: int = 128
    spacing_mm: float = 3.0
    channels: tuple[int, ...] = (16, 32, 64, 128)
    organs: tuple[str, ...] = tuple(ORGAN_IDS)


class BaselineSegmenter(nn.Module):
    def __init__(self, config: BaselineConfig):
        super().__init__()
        self.config = config
        self.windows = IntensityWindows(DEFAULT_WINDOWS)
        self.net = UNet(
            spatial_dims=2,
            in_channels=self.windows.out_channels,
            out_channels=len(ORGAN_IDS),
            channels=tuple(config.channels),
            strides=(2,) * (len(config.channels) - 1),
            num_res_units=1,
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Logits [B, K, S, S] for square slices [B, 1, S, S] of raw intensities."""
        return self.net(self.windows(image))

    @torch.inference_mode()
    def predict(self, images: torch.Tensor, organs: list[str]) -> torch.Tensor:
        """Probabilities [1, B, P, H, W] (a single "proposal") for slices [B, 1, H, W]."""
        self.eval()
        logits = self(to_square(images.float(), self.config.image_size))
        index = [list(ORGAN_IDS).index(o) for o in organs]
        probability = from_square(logits[:, index].sigmoid(), images.shape[2], images.shape[3])
        return probability[None]

    def save_pretrained(self, directory: str | Path) -> None:
        with atomic_directory(directory) as tmp:
            (tmp / BASELINE_CONFIG).write_text(json.dumps(asdict(self.config), indent=2))
            save_file({k: v.contiguous() for k, v in self.state_dict().items()}, tmp / "model.safetensors")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "BaselineSegmenter":
        directory = Path(directory)
        data = json.loads((directory / BASELINE_CONFIG).read_text())
        config = BaselineConfig(**{**data, "channels": tuple(data["channels"]), "organs": tuple(data["organs"])})
        model = cls(config)
        model.load_state_dict(load_file(directory / "model.safetensors"))
        return model.eval()


def is_baseline_folder(directory: str | Path) -> bool:
    return (Path(directory) / BASELINE_CONFIG).is_file()
