"""The app's datastore: a label save that fails half-way leaves the previous label and index intact."""

from __future__ import annotations

import json
import sys

import nibabel as nib
import numpy as np
import pytest

from server import APP_DIR, ROOT, copy_studies

sys.path.insert(0, str(APP_DIR))
from lib import datastore as app_datastore  # noqa: E402

SAMPLE = ROOT / "sample-datasets" / "ct"


def label_file(tmp_path, value: int):
    path = tmp_path / f"label_{value}.nii.gz"
    affine = nib.load(SAMPLE / "phantom_002.nii.gz").affine  # on the image's grid
    nib.save(nib.Nifti1Image(np.full((128, 104, 40), value, dtype=np.uint8), affine), path)
    return path


def test_interrupted_label_save_keeps_the_previous_label(tmp_path, monkeypatch):
    studies = copy_studies(SAMPLE, tmp_path / "studies")
    store = app_datastore.SafeLocalDatastore(str(studies), extensions=("*.nii.gz",), auto_reload=False)
    store.save_label("phantom_002", str(label_file(tmp_path, 1)), "final", {"by": "first"})
    stored = store.get_label_uri("phantom_002", "final")
    before = stored and open(stored, "rb").read()

    def copy_half_then_fail(source, target):  # a crash or a full disk in the middle of the copy
        data = open(source, "rb").read()
        open(target, "wb").write(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(app_datastore.shutil, "copyfile", copy_half_then_fail)
    with pytest.raises(OSError):
        store.save_label("phantom_002", str(label_file(tmp_path, 2)), "final", {"by": "second"})

    assert open(stored, "rb").read() == before
    assert np.asarray(nib.load(stored).dataobj).max() == 1
    assert not [p for p in (studies / "labels" / "final").iterdir() if p.name.startswith(".")]
    index = json.loads((studies / "datastore_v2.json").read_text())
    assert index["objects"]["phantom_002"]["labels"]["final"]["info"]["by"] == "first"

    monkeypatch.undo()
    store.save_label("phantom_002", str(label_file(tmp_path, 2)), "final", {"by": "second"})
    assert np.asarray(nib.load(store.get_label_uri("phantom_002", "final")).dataobj).max() == 2
