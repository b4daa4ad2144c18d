"""Writes a volume as a real CT/MR DICOM series (one file per slice): for DICOM tests and to fill a PACS.

    python -m progidiff.dicom_series IMAGE.nii.gz OUT_FOLDER [--modality CT] [--description "..."]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid


def write_series(volume: np.ndarray, spacing: float, origin_ras: tuple[float, float, float], folder: Path,
                 modality: str = "CT", description: str = "") -> Path:
    """`volume` [X, Y, Z] in RAS with isotropic `spacing`; DICOM's patient frame is LPS."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    storage = CTImageStorage if modality == "CT" else MRImageStorage
    for k in range(volume.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = storage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"slice_{k:04d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = storage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.FrameOfReferenceUID = study
        ds.Modality, ds.PatientID, ds.PatientName = modality, "PHANTOM", "Phantom^Test"
        ds.StudyDescription = ds.SeriesDescription = description or f"{modality} phantom"
        ds.SeriesNumber, ds.StudyDate, ds.StudyTime = 1, "20260101", "120000"
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = [-1, 0, 0, 0, -1, 0]  # columns along RAS +x, rows along RAS +y
        ds.ImagePositionPatient = [-origin_ras[0], -origin_ras[1], origin_ras[2] + k * spacing]
        ds.PixelSpacing = [spacing, spacing]
        ds.SliceThickness = spacing
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = np.ascontiguousarray(volume[:, :, k].T.astype(np.int16)).tobytes()
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(folder / f"slice_{k:04d}.dcm", write_like_original=False)
    return folder


def series_from_nifti(image: Path, folder: Path, modality: str = "CT", description: str = "") -> Path:
    """A NIfTI volume with isotropic voxels, axis-aligned (any flips), as a DICOM series in `folder`."""
    loaded = nib.as_closest_canonical(nib.load(str(image)))  # RAS
    spacing = np.abs(np.diag(loaded.affine)[:3])
    if not np.allclose(spacing, spacing[0]) or not np.allclose(loaded.affine[:3, :3], np.diag(spacing)):
        raise ValueError(f"{image}: isotropic, axis-aligned voxels are needed; affine {loaded.affine.tolist()}")
    volume = np.asarray(loaded.dataobj)
    return write_series(volume, float(spacing[0]), tuple(loaded.affine[:3, 3]), folder, modality,
                        description or Path(image).name.split(".")[0])


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a NIfTI volume as a DICOM series (one file per slice)")
    parser.add_argument("image", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--modality", default="CT", choices=["CT", "MR"])
    parser.add_argument("--description", default="")
    args = parser.parse_args()
    print(series_from_nifti(args.image, args.out, args.modality, args.description))


if __name__ == "__main__":
    main()
