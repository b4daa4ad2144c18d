"""A DICOM folder must hold one complete series; readers would otherwise stack it into a wrong volume."""

import numpy as np
import pytest

from progidiff.dicom_series import write_series
from progidiff.dicom_check import check_series_folder
from progidiff.predict import load_volume

VOLUME = (np.arange(16 * 16 * 10).reshape(16, 16, 10) % 300).astype(np.int16)


def test_a_complete_series_passes_and_loads(tmp_path):
    folder = write_series(VOLUME, 3.0, (0.0, 0.0, 0.0), tmp_path / "ok")
    check_series_folder(folder)
    assert load_volume(folder, 3.0).image.shape[-1] == 10


def test_a_missing_slice_is_named(tmp_path):
    folder = write_series(VOLUME, 3.0, (0.0, 0.0, 0.0), tmp_path / "gap")
    (folder / "slice_0004.dcm").unlink()
    with pytest.raises(ValueError, match=r"misses about 1 slice\(s\): a gap of 6.0 mm"):
        check_series_folder(folder)
    with pytest.raises(ValueError, match="misses about 1 slice"):
        load_volume(folder, 3.0)  # the CLIs' loader checks too


def test_mixed_series_are_named(tmp_path):
    folder = write_series(VOLUME, 3.0, (0.0, 0.0, 0.0), tmp_path / "mixed")
    other = write_series(VOLUME[:, :, :4], 3.0, (0.0, 0.0, 1.5), tmp_path / "other")
    for file in other.iterdir():
        file.rename(folder / f"other_{file.name}")
    with pytest.raises(ValueError, match=r"mixes 2 DICOM series: .* \(10 slices\), .* \(4 slices\)"):
        check_series_folder(folder)


def test_duplicates_and_single_slices_are_refused(tmp_path):
    folder = write_series(VOLUME[:, :, :1], 3.0, (0.0, 0.0, 0.0), tmp_path / "one")
    (folder / "notes.txt").write_text("not a slice")
    with pytest.raises(ValueError, match="1 DICOM image slice"):
        check_series_folder(folder)
    twice = write_series(VOLUME[:, :, :3], 3.0, (0.0, 0.0, 0.0), tmp_path / "twice")
    (twice / "copy.dcm").write_bytes((twice / "slice_0001.dcm").read_bytes())
    with pytest.raises(ValueError, match="same position"):
        check_series_folder(twice)
