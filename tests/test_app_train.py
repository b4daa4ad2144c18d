"""The MONAI Label loop over real HTTP: save a label → train → the new model serves; score → next sample."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests

from conftest import save_awake_tiny_model, weights_digest
from progidiff.labels import ORGAN_IDS
from progidiff.model import ProGiDiffModel
from progidiff.phantoms import make_phantom, save_nifti
from server import ROOT, Server, copy_studies

pytestmark = pytest.mark.server  # starts the real MONAI Label server

SAMPLE = ROOT / "sample-datasets" / "ct"
UNLABELLED_SEEDS = (7, 8)
TINY_TRAIN = {"max_epochs": 2, "train_batch_size": 4, "val_proposals": 1, "val_steps": 2, "learning_rate": 1e-3}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("train_app")
    save_awake_tiny_model(work / "model")
    studies = copy_studies(SAMPLE, work / "studies")
    for seed in UNLABELLED_SEEDS:  # two more unlabelled studies for scoring and active learning
        phantom = make_phantom(seed)
        save_nifti(phantom.ct, phantom.affine, studies / f"phantom_{seed:03d}.nii.gz")
    # One training thread: these tests infer while a run trains, on 2 cores (README: train_threads).
    conf = {"model_path": str(work / "model"), "train_dir": str(work / "runs"), "num_proposals": "2", "steps": "2",
            "train_threads": "1"}
    with Server(studies, conf, work) as running:
        yield running


def infer_json(server: Server, image: str) -> dict:
    response = requests.post(f"{server.url}/infer/progidiff", params={"image": image, "output": "json"},
                             files={"params": (None, json.dumps({"prompt": "liver", "seed": 3}))}, timeout=600)
    assert response.status_code == 200, response.text
    return response.json()


def put_label(server: Server, image: str, label: np.ndarray, affine: np.ndarray, label_info: list[dict]) -> None:
    buffer = io.BytesIO(nib.Nifti1Image(label, affine).to_bytes())
    response = requests.put(
        f"{server.url}/datastore/label", params={"image": image, "tag": "final"},
        files={"label": (f"{image}.nii", buffer), "params": (None, json.dumps({"label_info": label_info}))}, timeout=60,
    )
    assert response.status_code == 200, response.text


def test_put_label_train_publish_and_serve(server):
    # An annotator saves a label with the viewer's own ids (liver = 7 here), by name.
    phantom = make_phantom(2, slice_mm=3.0)  # phantom_002 of the sample set (3 mm slices), unlabelled there
    liver = (phantom.label == ORGAN_IDS["liver"]).astype(np.uint8) * 7
    put_label(server, "phantom_002", liver, phantom.affine, [{"name": "Liver", "idx": 7}])
    info = requests.get(f"{server.url}/datastore/", params={"output": "all"}, timeout=30).json()
    assert "final" in info["objects"]["phantom_002"]["labels"]

    before_digest = weights_digest(Path(server.conf["model_path"]))
    before = infer_json(server, "phantom_000")
    response = requests.post(f"{server.url}/train/progidiff", json=TINY_TRAIN, timeout=60)
    assert response.status_code == 200, response.text
    status = server.wait_for_task("train")
    assert status["status"] == "DONE", f"{status}\n{server.log_tail()}"

    stats = requests.get(f"{server.url}/info/", timeout=30).json()["train_stats"]["progidiff"]
    # Published only if the run's best epoch beat the served model on the same validation slices, by the margin.
    assert (stats["publish_margin"], stats["phantoms"], stats["contrast_rate"]) == (0.02, 8, 0.6)  # the defaults
    assert stats["pancreas_fat"] == 0  # lean phantom glands unless asked
    assert stats["published"] == (stats["best_metric"] > stats["served_val_mean_dice"] + stats["publish_margin"])
    if not stats["published"]:  # the admin's explicit way: promote the candidate
        assert weights_digest(Path(server.conf["model_path"])) == before_digest
        promote(stats["candidate"], server.conf["model_path"])
    assert weights_digest(Path(server.conf["model_path"])) != before_digest
    assert stats["epoch"] == 2 and "total_time" in stats
    assert 0.0 <= stats["eval"]["metrics"]["val_mean_dice"] <= 1.0
    assert [h["epoch"] for h in stats["history"]] == [1, 2]
    assert list(Path(stats["tensorboard"]).glob("events.out.tfevents.*"))
    ProGiDiffModel.from_pretrained(server.conf["model_path"])  # the published folder is a whole model

    after = infer_json(server, "phantom_000")  # no restart: the infer task reloads the published model
    assert not after["cached"]
    assert after["organ_stats"] != before["organ_stats"]


@pytest.mark.parametrize("options, error", [({"multi_gpu": "sometimes"}, "multi_gpu"),
                                            ({"multi_gpu": True, "gpus": "first"}, "gpus")])
def test_bad_distributed_options_are_refused_before_the_run(server, options, error):
    response = requests.post(f"{server.url}/train/progidiff", json={**TINY_TRAIN, **options}, timeout=60)
    assert response.status_code == 400 and error in response.text


def promote(candidate: str, model_dir: str) -> None:
    done = subprocess.run([sys.executable, "-m", "progidiff.promote", candidate, model_dir], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def folder_digest(folder: Path) -> str:
    """SHA-256 over every file of a folder (names and bytes): byte-identical or not."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return digest.hexdigest()


def app_trainers(tmp_path: Path):
    """The app's train-task module as MONAI Label imports it (no server), and settings over a tiny model."""
    sys.path.insert(0, str(ROOT / "apps" / "progidiff"))
    from lib.configs.progidiff import AppSettings
    from lib.trainers import progidiff as trainers

    save_awake_tiny_model(tmp_path / "model")
    return trainers, AppSettings.from_conf({}, tmp_path / "model")


def test_an_epoch_is_published_only_when_it_beats_the_served_model_by_the_margin(tmp_path):
    """Validation entries fed to the task's publisher as the training loop feeds them: an epoch a little better
    than the served model stays a candidate; one better by more than `publish_margin` replaces the served model;
    a later, worse epoch changes nothing."""
    from monailabel.tasks.train.basic_train import Context

    trainers, settings = app_trainers(tmp_path)
    saved: list[Path] = []

    class RecordingTrain(trainers.ProGiDiffTrain):
        def save_to(self, trainer, directory):
            saved.append(Path(directory))

    task = RecordingTrain(tmp_path / "model", tmp_path / "runs", settings, publish_path=tmp_path / "served")
    context = Context()
    context.request, context.run_id, context.world_size = {"name": "run"}, "1", 1
    context.output_dir, context.start_ts = str(tmp_path / "runs" / "run" / "1"), int(time.time())
    publisher = trainers._EpochPublisher(task, context, steps_per_epoch=4, epochs=3, margin=0.02)
    publisher.served = 0.80
    for step, dice in ((4, 0.81), (8, 0.83), (12, 0.82)):
        publisher(step, {"mean_dice": dice, "dice": {"liver": dice}})
    candidate = tmp_path / "runs" / "run" / "1" / "candidate"
    assert saved == [candidate, candidate, tmp_path / "served"]
    stats = json.loads((tmp_path / "runs" / "train_stats.json").read_text())
    assert (stats["published_epoch"], stats["eval"]["best_metric_epoch"], stats["publish_margin"]) == (2, 2, 0.02)


def test_a_non_contrast_ct_study_is_also_trained_in_enhanced_phases(tmp_path):
    """The datastore's non-contrast CT study is recognised as one, and `contrast_rate` of its samples show it in
    an enhanced phase (its aorta bright), as the default model's recipe trains; 0 shows it as scanned."""
    trainers, settings = app_trainers(tmp_path)
    task = trainers.ProGiDiffTrain(tmp_path / "model", tmp_path / "runs", settings)
    phantom = make_phantom(4, phase="non-contrast", slice_mm=3.0)
    z = int(np.argmax((phantom.label == ORGAN_IDS["aorta"]).sum(axis=(0, 1))))
    save_nifti(phantom.ct[:, :, z:z + 1], phantom.affine, tmp_path / "ct.nii.gz")
    save_nifti(phantom.label[:, :, z:z + 1], phantom.affine, tmp_path / "label.nii.gz")
    study = task._load({"image": tmp_path / "ct.nii.gz", "label": tmp_path / "label.nii.gz"}, 3.0)
    assert study.unenhanced_ct
    config = ProGiDiffModel.from_pretrained(tmp_path / "model").config

    def aorta_hu(options: dict) -> float:
        samples = task.training_set([study], {**task._config, "phantoms": 0, **options}, config)
        assert samples.contrast_rate == options.get("contrast_rate", 0.6)  # the task's default: the recipe's
        items = (samples[i] for i in range(24))
        centre = config.context_slices  # the slice itself, between its neighbours
        return float(np.mean([item["image"][centre][item["label"][0] == ORGAN_IDS["aorta"]].median() for item in items]))

    # Augmentation moves every sample by up to ±40 HU and ±10 %: the phases move the aorta by 100-350 HU.
    assert aorta_hu({"contrast_rate": 1.0}) > aorta_hu({"contrast_rate": 0.0}) + 60
    assert aorta_hu({}) > aorta_hu({"contrast_rate": 0.0}) + 30


def test_pancreas_fat_gives_the_ct_trainers_phantoms_fatty_glands(tmp_path):
    """`pancreas_fat` gives the phantoms mixed into a run fat between the pancreas' lobules, as the default model's
    last training stage saw them: their glands read darker than the default's lean ones, every label the same."""
    trainers, settings = app_trainers(tmp_path)
    task = trainers.ProGiDiffTrain(tmp_path / "model", tmp_path / "runs", settings)
    study = task._load({"image": SAMPLE / "phantom_000.nii.gz",
                        "label": SAMPLE / "labels" / "final" / "phantom_000.nii.gz"}, 3.0)
    config = ProGiDiffModel.from_pretrained(tmp_path / "model").config
    fatty = task.training_set([study], {**task._config, "phantoms": 2, "pancreas_fat": 0.5}, config).groups[0][0]
    lean = task.training_set([study], {**task._config, "phantoms": 2}, config).groups[0][0]
    assert len(fatty) == len(lean) == 2
    for a, b in zip(fatty, lean):
        np.testing.assert_array_equal(a.label, b.label)
        gland = a.label == ORGAN_IDS["pancreas"]
        assert gland.sum() > 100
        assert np.median(a.image[gland]) < np.median(b.image[gland]) - 5
        liver = a.label == ORGAN_IDS["liver"]
        assert np.median(a.image[liver]) == pytest.approx(np.median(b.image[liver]), abs=1.0)


def test_a_run_that_does_not_beat_the_served_model_leaves_it_byte_identical(tmp_path):
    """A short, careless run (1 epoch at a learning rate that wrecks the weights) on the default model: it is
    validated against the served model first, is worse, and is kept as a candidate; the served folder is
    byte-identical; promoting the candidate is an explicit step."""
    model = shutil.copytree(ROOT / "model" / "progidiff_ct", tmp_path / "model")
    before = folder_digest(model)
    studies = copy_studies(SAMPLE, tmp_path / "studies")  # phantom_000 and phantom_001 have final labels
    conf = {"model_path": str(model), "train_dir": str(tmp_path / "runs"), "num_proposals": "2", "steps": "1"}
    with Server(studies, conf, tmp_path) as server:
        careless = {"max_epochs": 1, "learning_rate": 0.05, "train_batch_size": 8, "val_proposals": 1, "val_steps": 1}
        response = requests.post(f"{server.url}/train/progidiff", json=careless, timeout=60)
        assert response.status_code == 200, response.text
        status = server.wait_for_task("train", timeout=1200)
        assert status["status"] == "DONE", f"{status}\n{server.log_tail()}"
        stats = requests.get(f"{server.url}/info/", timeout=30).json()["train_stats"]["progidiff"]
        assert stats["published"] is False and stats["published_epoch"] is None
        assert stats["best_metric"] < stats["served_val_mean_dice"], stats
        assert folder_digest(model) == before
        ProGiDiffModel.from_pretrained(stats["candidate"])  # a whole model, kept beside the run

        promote(stats["candidate"], str(model))
        assert folder_digest(model) != before
        served = requests.post(f"{server.url}/infer/progidiff", params={"image": "phantom_002", "output": "json"},
                               files={"params": (None, json.dumps({"prompt": "liver"}))}, timeout=600)
        assert served.status_code == 200, served.text


def test_scoring_then_strategy_picks_highest(server):
    response = requests.post(f"{server.url}/scoring/proposal_uncertainty",
                             json={"num_proposals": 2, "steps": 2, "slice_stride": 8}, timeout=60)
    assert response.status_code == 200, response.text
    assert server.wait_for_task("scoring")["status"] == "DONE", server.log_tail()

    objects = requests.get(f"{server.url}/datastore/", params={"output": "all"}, timeout=30).json()["objects"]
    unlabelled = [i for i, o in objects.items() if "final" not in o["labels"]]
    assert len(unlabelled) >= 2
    scores = {i: objects[i]["image"]["info"]["proposal_uncertainty"]["score"] for i in unlabelled}
    assert all(0.0 <= s <= 1.0 for s in scores.values())

    response = requests.post(f"{server.url}/activelearning/proposal_disagreement", json={}, timeout=600)
    assert response.status_code == 200, response.text
    chosen = response.json()
    assert chosen["id"] == max(scores, key=lambda i: (scores[i], i))
    assert chosen["score"] == pytest.approx(scores[chosen["id"]])
    assert chosen["proposal_uncertainty"]["score"] == chosen["score"]  # the image info, as MONAI Label adds it


def test_strategy_scores_unscored_images_on_the_fly(server, tmp_path):
    image = nib.load(SAMPLE / "phantom_000.nii.gz")
    buffer = io.BytesIO(image.to_bytes())
    response = requests.put(f"{server.url}/datastore/", params={"image": "fresh_upload"},
                            files={"file": ("fresh_upload.nii", buffer)}, timeout=60)
    assert response.status_code == 200, response.text
    response = requests.post(f"{server.url}/activelearning/proposal_disagreement",
                             json={"num_proposals": 2, "steps": 1, "slice_stride": 10}, timeout=600)
    assert response.status_code == 200, response.text
    info = requests.get(f"{server.url}/datastore/image/info", params={"image": "fresh_upload"}, timeout=30).json()
    assert "proposal_uncertainty" in info


def test_training_killed_mid_run_leaves_the_published_model_serving(server):
    response = requests.post(f"{server.url}/train/progidiff", json={**TINY_TRAIN, "max_epochs": 500}, timeout=60)
    assert response.status_code == 200, response.text
    stats_path = Path(server.conf["train_dir"]) / "progidiff" / "train_stats.json"
    deadline = time.time() + 300
    first_stats = stats_path.stat().st_mtime_ns if stats_path.exists() else 0
    while time.time() < deadline:  # wait until this run has published at least once
        if stats_path.exists() and stats_path.stat().st_mtime_ns != first_stats:
            break
        time.sleep(1)
    else:
        pytest.fail(f"training did not reach its first epoch:\n{server.log_tail()}")
    assert infer_json(server, "phantom_001")["organs"] == ["liver"]  # infer keeps answering while training runs
    assert requests.get(f"{server.url}/train/", timeout=30).json()["status"] == "RUNNING"
    requests.delete(f"{server.url}/train/", timeout=60)
    assert server.wait_for_task("train")["status"] != "RUNNING"

    ProGiDiffModel.from_pretrained(server.conf["model_path"])
    assert infer_json(server, "phantom_000")["organs"] == ["liver"]

