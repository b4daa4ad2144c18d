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
    # Published only if the run's best epoch beat the served model on the same validation slices.
    assert stats["published"] == (stats["best_metric"] > stats["served_val_mean_dice"])
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

