"""The infer task in process (no server): one model version per request, even when a newer one is published
while the request runs; the scan encoder's features reused for another prompt on the same image; a 400 only
when the image is at fault, a 5xx when the server is."""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from fastapi import HTTPException
from monai import transforms as mt
from monailabel.tasks.infer.basic_infer import CallBackTypes

from conftest import save_awake_tiny_model, wake_control_branch, tiny_config
from progidiff import lora
from progidiff.intensity import normalisation_for
from progidiff.io_utils import atomic_directory
from progidiff.model import ProGiDiffModel
from server import APP_DIR, ROOT

sys.path.insert(0, str(APP_DIR))
from lib.configs.progidiff import AppSettings  # noqa: E402
from lib.infers.progidiff import ProGiDiffInfer  # noqa: E402

IMAGE = ROOT / "sample-datasets" / "ct" / "phantom_000.nii.gz"
REQUEST = {"image": str(IMAGE), "prompt": "liver, spleen", "num_proposals": 2, "steps": 1, "device": "cpu"}


def infer_task(model_dir: Path) -> ProGiDiffInfer:
    settings = AppSettings.from_conf({"model_path": str(model_dir), "device": "cpu"}, model_dir)
    return ProGiDiffInfer(model_dir, settings)


def publish_other_weights(model_dir: Path) -> None:
    """What a training run's publish does: a whole new folder renamed into place."""
    torch.manual_seed(7)
    model = ProGiDiffModel.from_config(tiny_config())
    wake_control_branch(model, scale=0.6)
    with atomic_directory(model_dir) as new:
        model.save_pretrained(new)


def label_of(task: ProGiDiffInfer, callbacks: dict | None = None) -> tuple[np.ndarray, dict]:
    path, result = task(dict(REQUEST), callbacks)
    return np.asarray(nib.load(path).dataobj), result


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of voxels with the same label (not bit for bit: a voxel on the threshold may go either way)."""
    return float((a == b).mean())


def test_a_publish_during_a_request_changes_neither_its_answer_nor_what_is_cached_under_its_version(tmp_path):
    first = save_awake_tiny_model(tmp_path / "first")
    v1_label, _ = label_of(infer_task(first))
    second = save_awake_tiny_model(tmp_path / "second")
    publish_other_weights(second)
    v2_label, _ = label_of(infer_task(second))
    assert agreement(v1_label, v2_label) < 0.9  # the two versions answer differently

    served = save_awake_tiny_model(tmp_path / "served")
    task = infer_task(served)

    def publish_after_loading(data):  # a training run publishes while the request is under way
        publish_other_weights(served)
        return data

    during, result = label_of(task, {CallBackTypes.PRE_TRANSFORMS: publish_after_loading})
    assert agreement(during, v1_label) > 0.999  # the version the request started with, throughout
    after, result = label_of(task)
    assert not result["cached"]  # the v1 answer was not filed as v2's
    assert agreement(after, v2_label) > 0.999


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> ProGiDiffInfer:
    return infer_task(save_awake_tiny_model(tmp_path_factory.mktemp("model")))


def test_an_image_without_a_sound_geometry_is_the_requests_fault(task, tmp_path):
    collinear = np.diag([1.5, 1.5, 3.0, 1.0])
    collinear[:3, 1] = collinear[:3, 0]  # two axes point the same way: no voxel-to-world mapping
    path = tmp_path / "collinear.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((40, 40, 20), np.int16), collinear), path)
    with pytest.raises(HTTPException) as refused:
        task({**REQUEST, "image": str(path)})
    assert refused.value.status_code == 400 and "affine" in refused.value.detail


def test_running_out_of_memory_while_reading_is_the_servers_fault(task, monkeypatch):
    def out_of_memory(self, data):
        raise MemoryError()

    monkeypatch.setattr(mt.LoadImaged, "__call__", out_of_memory)
    with pytest.raises(HTTPException) as refused:
        task(dict(REQUEST))
    assert refused.value.status_code == 503 and "memory" in refused.value.detail


def test_a_failure_after_the_image_was_read_and_checked_is_no_400(task, monkeypatch):
    def broken(self, data):
        raise TypeError("a bug in resampling")

    monkeypatch.setattr(mt.Spacingd, "__call__", broken)
    with pytest.raises(Exception) as failed:  # the server answers 500 and logs the traceback
        task(dict(REQUEST))
    assert not isinstance(failed.value, HTTPException)


def test_a_second_prompt_on_the_same_image_reuses_the_scan_features(tmp_path):
    task = infer_task(save_awake_tiny_model(tmp_path / "model"))
    _, first = task({**REQUEST, "prompt": "liver"})
    assert first["latencies"]["encode"] > 0 and first["latencies"]["sample"] > 0
    label, second = task({**REQUEST, "prompt": "spleen"})
    assert second["latencies"]["encode"] == 0 and not second["cached"]
    fresh_label, _ = infer_task(task.model_dir)({**REQUEST, "prompt": "spleen"})
    assert agreement(np.asarray(nib.load(label).dataobj), np.asarray(nib.load(fresh_label).dataobj)) > 0.999


def test_an_mr_study_without_an_mr_adapter_is_answered_with_a_warning(task):
    mr = ROOT / "sample-datasets" / "mr" / "phantom_000_mr.nii.gz"
    _, result = task({**REQUEST, "image": str(mr), "prompt": "liver"})
    assert (result["modality"], result["adapter"]) == ("MR", None)
    assert any("no MR adapter is published" in w and "/train/progidiff_mr_lora" in w for w in result["warnings"])


def test_an_adapter_trained_on_another_model_is_named_in_the_warning_and_ct_is_still_served(tmp_path):
    """The model replaced by a 2.5D one while the MR adapter of the old one stays published: MR studies get the
    bare model with a warning that says why, CT studies are answered as before (no 500 on every request)."""
    old = ProGiDiffModel.from_pretrained(save_awake_tiny_model(tmp_path / "old_model"))
    settings = lora.LoraSettings(rank=4)
    lora.add_adapter(old, "mr", settings)
    lora.save_adapter(old, "mr", tmp_path / "adapters" / "mr", settings,
                      extra=lora.adapter_record("MR", tmp_path / "old_model", normalisation_for("MR")))
    task = infer_task(save_awake_tiny_model(tmp_path / "model", context_slices=1))
    mr = ROOT / "sample-datasets" / "mr" / "phantom_000_mr.nii.gz"
    _, result = task({**REQUEST, "image": str(mr), "prompt": "liver"})
    assert (result["modality"], result["adapter"]) == ("MR", None)
    assert any("adapter does not fit" in w and "retrain" in w for w in result["warnings"]), result["warnings"]
    _, ct = task({**REQUEST, "prompt": "liver"})
    assert ct["modality"] == "CT" and not any("adapter" in w for w in ct["warnings"])


def test_an_mr_adapter_reads_each_study_rescaled_so_the_scanners_scale_does_not_matter(tmp_path):
    model_dir = save_awake_tiny_model(tmp_path / "model")
    model = ProGiDiffModel.from_pretrained(model_dir)
    settings = lora.LoraSettings(rank=4)
    lora.add_adapter(model, "mr", settings)
    lora.save_adapter(model, "mr", tmp_path / "adapters" / "mr", settings,
                      extra=lora.adapter_record("MR", model_dir, normalisation_for("MR")))
    source = nib.load(ROOT / "sample-datasets" / "mr" / "phantom_000_mr.nii.gz")
    studies = {}
    for name, (scale, offset) in {"scanner_a": (1.0, 0.0), "scanner_b": (2.5, 40.0)}.items():
        studies[name] = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(np.asarray(source.dataobj, dtype=np.float32) * scale + offset, source.affine),
                 studies[name])
    task = infer_task(model_dir)

    def labels(modality: str) -> list[np.ndarray]:
        answers = []
        for study in studies.values():
            path, result = task({**REQUEST, "image": str(study), "prompt": "liver", "modality": modality})
            assert result["adapter"] == ("mr" if modality == "MR" else None)
            answers.append(np.asarray(nib.load(path).dataobj))
        return answers

    a, b = labels("MR")
    assert a.any() and agreement(a, b) > 0.999  # rescaled per study: the same answer from either scanner
    ct_a, ct_b = labels("CT")  # the bare CT model reads intensities as they are (HU)
    assert agreement(ct_a, ct_b) < 0.99


def test_a_fresh_clone_serves_mr_with_the_shipped_adapter():
    """The served model folder with the shipped `model/adapters/mr`: the sample MR study gets the adapter, and no
    organ volume outside the adult ranges (a CT-only folder answers with a warning: the test above)."""
    task = infer_task(ROOT / "model" / "progidiff_ct")
    mr = ROOT / "sample-datasets" / "mr" / "phantom_000_mr.nii.gz"
    _, result = task({**REQUEST, "image": str(mr), "prompt": "liver, spleen, left kidney", "num_proposals": 3})
    assert (result["modality"], result["adapter"]) == ("MR", "mr")
    assert result["warnings"] == [] and result["organ_stats"]["liver"]["consensus_volume_ml"] > 0
