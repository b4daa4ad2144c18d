"""What an image file says it holds, read from its header alone: checked before anything is decompressed.

A 1 MB gzip NIfTI can declare 10⁹ voxels; reading it would allocate gigabytes before any check ran. Here the
header's shape, voxel type and spacing are read (NIfTI, NRRD, a DICOM series folder) and a request is refused
when the volume would not fit the memory limit or is not a plausible CT/MR volume.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pydicom

WORKING_BYTES = 4  # a volume is worked on as float32, whatever it is stored as
MAX_SPACING_MM = 15.0  # thicker voxels than this are no diagnostic CT/MR (and make 60-litre organs)
MIN_SPACING_MM = 0.05
MAX_EXTENT_MM = 2500.0  # a whole adult body fits in 2 m along every axis


class ImplausibleImage(ValueError):
    """The header describes a volume this server will not read; the message says why and what is accepted."""

    def __init__(self, message: str, too_large: bool = False):
        super().__init__(message)
        self.too_large = too_large


@dataclass(frozen=True)
class DeclaredVolume:
    shape: tuple[int, ...]
    spacing_mm: tuple[float, ...]

    @property
    def voxels(self) -> int:
        return int(np.prod([int(s) for s in self.shape], dtype=np.float64))


def declared_volume(path: str | Path) -> DeclaredVolume | None:
    """Shape and spacing from the header of a NIfTI or NRRD file or a DICOM series folder; None for other
    formats (their reader decides)."""
    path = Path(path)
    name = path.name.lower()
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.is_file())
        if not files:
            return None
        first = pydicom.dcmread(str(files[0]), stop_before_pixels=True, force=True)
        spacing = [float(v) for v in getattr(first, "PixelSpacing", [1.0, 1.0])]
        thickness = float(getattr(first, "SliceThickness", 1.0) or 1.0)
        return DeclaredVolume((int(first.Columns), int(first.Rows), len(files)), (*spacing, thickness))
    if name.endswith((".nii", ".nii.gz")):
        header = nib.load(str(path)).header
        return DeclaredVolume(tuple(int(s) for s in header.get_data_shape()),
                              tuple(float(z) for z in header.get_zooms()[:3]))
    if name.endswith(".nrrd"):
        header = nrrd.read_header(str(path))
        sizes = tuple(int(s) for s in header["sizes"])
        directions = header.get("space directions")
        if directions is None:
            spacing = tuple(float(s) for s in header.get("spacings", [1.0] * len(sizes)))
        else:
            spacing = tuple(float(np.linalg.norm(d)) for d in np.asarray(directions, dtype=float) if np.isfinite(d).all())
        return DeclaredVolume(sizes, spacing)
    return None


def check_declared_volume(path: str | Path, max_bytes: float, what: str = "image") -> DeclaredVolume | None:
    """Refuse (ImplausibleImage) a file whose header declares a volume larger than `max_bytes` as float32, with
    voxels thinner than 0.05 mm or thicker than 15 mm, or longer than 2.5 m along an axis."""
    try:
        declared = declared_volume(path)
    except Exception:  # noqa: BLE001 - an unreadable header is the reader's to report, with its own message
        return None
    if declared is None:
        return None
    needed = declared.voxels * WORKING_BYTES
    if needed > max_bytes:
        raise ImplausibleImage(
            f"the {what} declares {declared.voxels:,} voxels (shape {declared.shape}), {needed / 2**30:.1f} GiB to "
            f"work on, above this server's limit of {max_bytes / 2**30:.1f} GiB (max_memory_gb); crop or resample "
            "it, or raise the limit", too_large=True)
    spacing = [s for s in declared.spacing_mm[:3] if s > 0]
    if any(s > MAX_SPACING_MM or s < MIN_SPACING_MM for s in spacing):
        raise ImplausibleImage(f"the {what} declares voxels of {tuple(round(s, 3) for s in spacing)} mm; accepted: "
                               f"{MIN_SPACING_MM} to {MAX_SPACING_MM:g} mm along every axis")
    extent = [n * s for n, s in zip(declared.shape[:3], spacing)]
    if any(e > MAX_EXTENT_MM for e in extent):
        raise ImplausibleImage(f"the {what} spans {tuple(round(e) for e in extent)} mm; accepted: at most "
                               f"{MAX_EXTENT_MM:g} mm along every axis")
    return declared
