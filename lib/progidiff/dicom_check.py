"""Refuse a DICOM folder that is not one complete series, before a reader stacks it into a wrong volume.

MONAI's readers stack whatever slices a folder holds: two series interleave into one volume, and a
missing slice silently shortens the body by one slice spacing.  Both would give a wrong mask with no
error, so the folder is checked first from the headers alone (no pixel data read).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
from monai.transforms import MapTransform

HEADER_TAGS = ["SeriesInstanceUID", "ImagePositionPatient", "ImageOrientationPatient", "Rows", "Columns"]
GAP_TOLERANCE = 1.5  # a step between neighbouring slices this many times the usual one means slices are missing


def _headers(folder: Path) -> list[pydicom.Dataset]:
    headers = []
    for file in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            ds = pydicom.dcmread(file, stop_before_pixels=True, specific_tags=HEADER_TAGS)
        except (pydicom.errors.InvalidDicomError, OSError):
            continue  # DICOMDIR, notes, thumbnails: not slices
        if "ImagePositionPatient" in ds:
            headers.append(ds)
    return headers


def check_series_folder(folder: str | Path) -> None:
    """Raise ValueError naming the problem unless `folder` holds exactly one DICOM series of ≥ 2 slices of
    one size and orientation, evenly spaced (no missing and no duplicate slice positions)."""
    folder = Path(folder)
    headers = _headers(folder)
    if len(headers) < 2:
        raise ValueError(f"the folder holds {len(headers)} DICOM image slice(s); a 3D series needs at least 2")
    series = Counter(str(ds.get("SeriesInstanceUID", "")) for ds in headers)
    if len(series) > 1:
        listed = ", ".join(f"{uid or 'no UID'} ({count} slices)" for uid, count in series.most_common(4))
        raise ValueError(f"the folder mixes {len(series)} DICOM series: {listed}; put one series per folder")
    if len({(int(ds.Rows), int(ds.Columns)) for ds in headers}) > 1:
        raise ValueError("the series' slices differ in size (Rows × Columns); one series has one slice size")
    orientations = np.array([[float(v) for v in ds.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])] for ds in headers])
    if np.abs(orientations - orientations[0]).max() > 1e-3:
        raise ValueError("the series' slices differ in orientation (ImageOrientationPatient); a 3D series has one")
    normal = np.cross(orientations[0][:3], orientations[0][3:])
    positions = np.sort([float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient])) for ds in headers])
    steps = np.diff(positions)
    if steps.min() < 1e-3:
        raise ValueError("two slices of the series lie at the same position (duplicate slices)")
    usual = float(np.median(steps))
    gaps = np.nonzero(steps > GAP_TOLERANCE * usual)[0]
    if len(gaps):
        first = int(gaps[0])
        missing = int(round(sum(steps[g] / usual - 1 for g in gaps)))
        raise ValueError(
            f"the series misses about {missing} slice(s): a gap of {steps[first]:.1f} mm after slice position "
            f"{positions[first]:.1f} mm where slices are {usual:.1f} mm apart; send the complete series"
        )


class CheckDicomSeriesd(MapTransform):
    """MONAI transform placed before `LoadImaged`: a key naming a folder must hold one complete series."""

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            if isinstance(d[key], (str, Path)) and Path(d[key]).is_dir():
                check_series_folder(d[key])
        return d
