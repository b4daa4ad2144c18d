"""The app's datastore: a label save that fails half-way leaves the previous label and index intact; two
processes writing the index at once (the server saving labels, a scoring subprocess storing scores) lose
nothing; a removed image is gone at once and after a restart."""

from __future__ import annotations

import json
import multiprocessing
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
    image = nib.load(SAMPLE / "phantom_002.nii.gz")  # on the image's grid
    nib.save(nib.Nifti1Image(np.full(image.shape, value, dtype=np.uint8), image.affine), path)
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


def open_store(studies):
    return app_datastore.SafeLocalDatastore(str(studies), extensions=("*.nii.gz",), auto_reload=False)


def store_scores(studies, rounds: int, ready) -> None:
    """A scoring subprocess: its own datastore object, its own copy of the index in memory."""
    store = open_store(studies)
    ready.set()
    for i in range(rounds):
        store.update_image_info("phantom_001", {f"score_{i}": i})


def test_scores_and_labels_written_at_once_by_two_processes_are_all_kept(tmp_path):
    studies = copy_studies(SAMPLE, tmp_path / "studies")
    server = open_store(studies)
    rounds = 20
    labels = [label_file(tmp_path, value) for value in (1, 2)]
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    scoring = context.Process(target=store_scores, args=(studies, rounds, ready))
    scoring.start()
    assert ready.wait(timeout=120)
    for i in range(rounds):
        server.save_label("phantom_002", str(labels[i % 2]), f"tag_{i}", {"round": i})
    scoring.join(timeout=120)
    assert scoring.exitcode == 0

    server.refresh()  # what the server's folder watcher does when another process writes the index
    for store in (server, open_store(studies)):  # the server's view, and the file a restarted server reads
        assert sorted(store._datastore.objects["phantom_002"].labels) == sorted(f"tag_{i}" for i in range(rounds))
        info = store.get_image_info("phantom_001")
        assert [info.get(f"score_{i}") for i in range(rounds)] == list(range(rounds))


def test_a_removed_image_is_gone_at_once_and_after_a_restart(tmp_path):
    studies = copy_studies(SAMPLE, tmp_path / "studies")
    store = app_datastore.SafeLocalDatastore(str(studies), extensions=("*.nii.gz",), auto_reload=True)
    store.save_label("phantom_002", str(label_file(tmp_path, 1)), "final", {})
    store.remove_image("phantom_002")
    assert "phantom_002" not in store.list_images()  # not left to the folder watcher
    assert not list(studies.rglob("phantom_002*"))
    assert "phantom_002" not in open_store(studies).list_images()
    with pytest.raises(app_datastore.HTTPException) as refused:
        store.remove_image("phantom_002")
    assert refused.value.status_code == 404
