"""MR adaptation over real HTTP: a LoRA train task publishes a small adapter; infer routes MR studies to it
(by the request's modality, the DICOM Modality tag, or the intensity rule) and CT studies to the bare model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests

from conftest import save_awake_tiny_model
from progidiff.dicom_series import write_series
from progidiff.model import CONTROL_WEIGHTS
from server import ROOT, Server, copy_studies

pytestmark = pytest.mark.server  # starts the real MONAI Label server

SAMPLE = ROOT / "sample-datasets"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("lora_app")
    save_awake_tiny_model(work / "models" / "ct", organs=["liver", "spleen"])
    studies = copy_studies(SAMPLE / "mr", work / "studies")  # phantom_000_mr labelled, phantom_001_mr not
    shutil.copy(SAMPLE / "ct" / "phantom_000.nii.gz", studies / "phantom_000.nii.gz")
    conf = {"model_path": str(work / "models" / "ct"), "train_dir": str(work / "runs"), "num_proposals": "2",
            "steps": "2", "image_roots": str(work)}
    with Server(studies, conf, work) as running:
        yield running


def infer(server: Server, image: str, **params) -> dict:
    response = requests.post(f"{server.url}/infer/progidiff", params={"image": image, "output": "json"},
                             files={"params": (None, json.dumps({"prompt": "liver", "seed": 1, **params}))}, timeout=600)
    assert response.status_code == 200, response.text
    return response.json()


def test_lora_training_publishes_an_adapter_that_mr_requests_use(server):
    bare_mr = infer(server, "phantom_001_mr")
    assert bare_mr["modality"] == "MR" and bare_mr["adapter"] is None  # no adapter yet

    response = requests.post(f"{server.url}/train/progidiff_mr_lora", timeout=60, json={
        "max_epochs": 1, "train_batch_size": 4, "val_proposals": 1, "val_steps": 1, "rank": 4})
    assert response.status_code == 200, response.text
    assert server.wait_for_task("train")["status"] == "DONE", server.log_tail()

    adapter = Path(server.conf["model_path"]).parent / "adapters" / "mr"
    stats = requests.get(f"{server.url}/info/", timeout=30).json()["train_stats"]["progidiff_mr_lora"]
    # Published only if it beat what MR studies got so far (no adapter: the bare model) on the same validation.
    assert stats["published"] == (stats["best_metric"] > stats["served_val_mean_dice"] + stats["publish_margin"])
    if not stats["published"]:  # the admin's explicit way
        assert not adapter.exists()
        done = subprocess.run([sys.executable, "-m", "progidiff.promote", stats["candidate"], str(adapter)],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    model_bytes = (Path(server.conf["model_path"]) / "controlnet" / CONTROL_WEIGHTS).stat().st_size
    assert (adapter / "adapter_model.safetensors").stat().st_size < 0.1 * model_bytes
    assert 0 < stats["trainable_share"] < 0.05 and stats["trainable_parameters"] > 0
    assert (stats["phantoms"], stats["real_weight"]) == (8, 0.8)  # the MR phantoms mixed in by default
    assert stats["pancreas_fat"] == 0  # lean phantom glands unless asked

    adapted = infer(server, "phantom_001_mr")  # by the intensity rule (NIfTI has no modality tag)
    assert (adapted["adapter"], adapted["modality_source"]) == ("mr", "intensity")
    assert adapted["organ_stats"] != bare_mr["organ_stats"]

    forced_ct = infer(server, "phantom_001_mr", modality="CT")  # the request's modality wins
    assert forced_ct["adapter"] is None and forced_ct["organ_stats"] == bare_mr["organ_stats"]
    assert infer(server, "phantom_000")["adapter"] is None  # CT studies keep the bare CT model


def test_dicom_modality_tag_routes_to_the_adapter(server):
    adapter = Path(server.conf["model_path"]).parent / "adapters" / "mr"
    if not adapter.is_dir():
        pytest.skip("needs the adapter published by the previous test")
    source = nib.load(SAMPLE / "mr" / "phantom_001_mr.nii.gz")
    # MR intensities shifted below −500 would read as CT by the intensity rule: only the tag says MR.
    volume = np.asarray(source.dataobj).astype(np.int16) - 1000
    folder = write_series(volume, 3.0, tuple(source.affine[:3, 3]), Path(server.conf["image_roots"]) / "dicom_mr",
                          modality="MR")
    result = infer(server, str(folder))
    assert (result["modality"], result["modality_source"], result["adapter"]) == ("MR", "dicom", "mr")


def test_concurrent_ct_and_mr_requests_match_sequential_answers(server):
    from concurrent.futures import ThreadPoolExecutor

    # 8 distinct requests; the result cache keeps the last 4, so the first 4 are sampled again concurrently.
    asked = [("phantom_000" if i % 2 else "phantom_001_mr", 100 + i) for i in range(8)]
    sequential = [infer(server, image, seed=seed) for image, seed in asked]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(lambda item: infer(server, item[0], seed=item[1]), asked[:4]))
    assert not any(r["cached"] for r in concurrent)
    assert [(r["adapter"], r["organ_stats"]) for r in concurrent] == [(r["adapter"], r["organ_stats"]) for r in sequential[:4]]


def test_a_second_run_is_measured_against_the_published_adapter(server):
    """A careless second run (a learning rate that wrecks the adapter): validated first with the published
    adapter, and the published adapter is replaced only if the run beats it."""
    adapter = Path(server.conf["model_path"]).parent / "adapters" / "mr"
    if not adapter.is_dir():
        pytest.skip("needs the adapter published by the first test")
    before = {p.name: p.read_bytes() for p in adapter.iterdir()}
    response = requests.post(f"{server.url}/train/progidiff_mr_lora", timeout=60, json={
        "max_epochs": 1, "train_batch_size": 4, "val_proposals": 1, "val_steps": 1, "rank": 4, "learning_rate": 1.0})
    assert response.status_code == 200, response.text
    assert server.wait_for_task("train")["status"] == "DONE", server.log_tail()
    stats = requests.get(f"{server.url}/info/", timeout=30).json()["train_stats"]["progidiff_mr_lora"]
    assert "served model: validation mean Dice" in server.log_tail(200_000)
    assert stats["published"] == (stats["best_metric"] > stats["served_val_mean_dice"] + stats["publish_margin"])
    after = {p.name: p.read_bytes() for p in adapter.iterdir()}
    assert (after == before) == (not stats["published"])


def test_scoring_picks_the_adapter_as_infer_does(server):
    """Active-learning scores of MR studies come from the MR adapter, CT studies' from the bare model."""
    if not (Path(server.conf["model_path"]).parent / "adapters" / "mr").is_dir():
        pytest.skip("needs the adapter published by the first test")
    response = requests.post(f"{server.url}/scoring/proposal_uncertainty",
                             json={"num_proposals": 2, "steps": 1, "slice_stride": 8}, timeout=60)
    assert response.status_code == 200, response.text
    assert server.wait_for_task("scoring")["status"] == "DONE", server.log_tail()
    objects = requests.get(f"{server.url}/datastore/", params={"output": "all"}, timeout=30).json()["objects"]
    scored = {i: o["image"]["info"]["proposal_uncertainty"] for i, o in objects.items()
              if "proposal_uncertainty" in o["image"]["info"]}
    assert (scored["phantom_001_mr"]["modality"], scored["phantom_001_mr"]["adapter"]) == ("MR", "mr")
    assert (scored["phantom_000"]["modality"], scored["phantom_000"]["adapter"]) == ("CT", None)


def test_the_mr_trainer_mixes_mr_phantoms_read_as_mr_studies_are(tmp_path):
    """The few labelled MR studies at `real_weight` of the samples, MR phantoms (seeds 1000 on) at the rest,
    rescaled per study as the adapter reads MR; `phantoms` 0: the datastore alone."""
    sys.path.insert(0, str(ROOT / "apps" / "progidiff"))
    from lib.configs.progidiff import AppSettings
    from lib.trainers.progidiff_lora import ProGiDiffLoraTrain
    from progidiff.data import normalised, phantom_volume

    task = ProGiDiffLoraTrain(tmp_path, tmp_path / "adapters", tmp_path / "runs", AppSettings.from_conf({}, tmp_path))
    study = task._load({"image": SAMPLE / "mr" / "phantom_000_mr.nii.gz",
                        "label": SAMPLE / "mr" / "labels" / "final" / "phantom_000_mr.nii.gz"}, 3.0)
    (phantoms, phantom_share), (studies, study_share) = task.training_groups([study], 2, 0.75)
    assert studies == [study] and (phantom_share, study_share) == pytest.approx((0.25, 0.75))
    assert len(phantoms) == 2
    for seed, phantom in zip((1000, 1001), phantoms):
        raw = phantom_volume(seed, "mr")
        assert not np.allclose(phantom.image, raw.image, rtol=0.05, atol=1.0)  # rescaled, not as made
        np.testing.assert_allclose(phantom.image, normalised(raw, task.normalisation).image, rtol=1e-5, atol=1e-3)
        np.testing.assert_array_equal(phantom.label, raw.label)
    assert task.training_groups([study], 0, 0.75) == task.training_groups([study], 8, 1.0) == [([study], 1.0)]
