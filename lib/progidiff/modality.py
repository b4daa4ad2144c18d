"""Which modality a study is: the request says, else the DICOM header, else a rule on intensities."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom

MODALITIES = ("CT", "MR")


def dicom_modality(path: str | Path) -> str | None:
    """The Modality tag of a DICOM file or of the first readable file in a series folder."""
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    for file in files:
        try:
            value = pydicom.dcmread(file, stop_before_pixels=True, specific_tags=["Modality"]).get("Modality")
        except (pydicom.errors.InvalidDicomError, OSError):
            continue
        return str(value).upper() if value else None
    return None


def intensity_modality(volume: np.ndarray) -> str:
    """NIfTI has no modality tag. HU-calibrated CT has air near −1000 (its 1st percentile is far below
    zero); MR magnitudes are non-negative. So: CT if the 1st percentile is below −500, else MR."""
    return "CT" if float(np.percentile(np.asarray(volume)[::2, ::2, ::2], 1)) < -500 else "MR"


def resolve_modality(requested: str, image_path: str | Path, volume: np.ndarray) -> tuple[str, str]:
    """(modality, where it came from): "request", "dicom" or "intensity"."""
    if requested.upper() in MODALITIES:
        return requested.upper(), "request"
    if image_path and Path(image_path).exists() and (Path(image_path).is_dir() or str(image_path).endswith(".dcm")):
        header = dicom_modality(image_path)
        if header in MODALITIES:
            return header, "dicom"
    return intensity_modality(volume), "intensity"
