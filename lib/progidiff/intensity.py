"""Per-study intensity normalisation for modalities without a calibrated scale (MR).

CT is in Hounsfield units: the scan encoder's windows read it as it is.  MR magnitudes are arbitrary: two
scanners (or two coils, or a different receiver gain) give the same anatomy at different scales.  So an MR
study is rescaled linearly so that its `lower` and `upper` intensity percentiles land on `b_min` and
`b_max` (MONAI's `ScaleIntensityRangePercentiles`, no clipping): the result does not depend on the
scanner's scale or offset, and percentiles of the whole study move little under a smooth bias field (the
adapter is also trained with random bias fields, see `progidiff.data.augmentation`).

The normalisation belongs to the weights that expect it: an adapter trained on normalised MR records it in
its `adapter_config.json` (`"intensity"`), and whoever runs the adapter applies what it records.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from monai.transforms import ScaleIntensityRangePercentiles
from monai.utils import convert_to_dst_type


@dataclass(frozen=True)
class PercentileNormalisation:
    lower: float = 1.0  # percentile mapped to b_min (MR: the background)
    upper: float = 99.0  # percentile mapped to b_max (MR: the brightest tissue, fat in T1)
    b_min: float = 0.0
    b_max: float = 400.0  # inside the encoder's soft-tissue window's reach, as CT organs are

    def __call__(self, image: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """The study rescaled, as float32 (numpy in, numpy out; tensor in, tensor out)."""
        scale = ScaleIntensityRangePercentiles(self.lower, self.upper, self.b_min, self.b_max, clip=False)
        floats = image.float() if torch.is_tensor(image) else np.asarray(image, dtype=np.float32)
        return convert_to_dst_type(scale(floats), floats)[0]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> "PercentileNormalisation | None":
        return cls(**data) if data else None


def normalisation_for(modality: str) -> PercentileNormalisation | None:
    """The one rule of which studies are rescaled before the model: MR (and other uncalibrated modalities),
    not CT."""
    return None if modality.upper() == "CT" else PercentileNormalisation()
