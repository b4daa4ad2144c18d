"""The MONAI Label app over real HTTP: a real server on loopback, a temporary copy of the sample data."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import requests
from requests_toolbelt.multipart import decoder

from conftest import save_awake_tiny_model
from progidiff.dicom_series import write_series
from progidiff.labels import ORGAN_IDS
from progidiff.prompts import KNOWN_ORGANS
from server import ROOT, Server, copy_studies

pytestmark = pytest.mark.server  # starts the real MONAI Label server

SAMPLE = ROOT / "sample-datasets" / "ct"
IMAGE = "phantom_000"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("app")
    save_awake_tiny_model(work / "model")
    studies = copy_studies(SAMPLE, work / "studies")
    conf = {"model_path": str(work / "model"), "num_proposals": "3", "steps": "2",
            "image_roots": str(tmp_path_factory.getbasetemp())}  # where the DICOM test writes its series
    with Server(studies, conf, work) as running:
        yield running


def infer(server: Server, params: dict, image: str = IMAGE, output: str = "all") -> requests.Response:
    return requests.post(f"{server.url}/infer/progidiff", params={"image": image, "output": output},
                         files={"params": (None, json.dumps(params))}, timeout=600)


def split_multipart(response: requests.Response) -> tuple[nib.Nifti1Image, dict]:
    """The default output: the label file and the task's JSON result in one multipart body."""
    parts = decoder.MultipartDecoder(response.content, response.headers["content-type"]).parts
    result, image = None, None
    for part in parts:
        disposition = part.headers[b"Content-Disposition"].decode()
        if 'name="params"' in disposition:
            result = json.loads(part.content)
        else:
            image = nib.Nifti1Image.from_bytes(_gunzip(part.content))
    return image, result


def _gunzip(content: bytes) -> bytes:
    import gzip

    return gzip.decompress(content) if content[:2] == b"\x1f\x8b" else content


def load_nifti_bytes(content: bytes) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(_gunzip(content))


def test_info_lists_the_model_and_its_organs(server):
    info = requests.get(f"{server.url}/info/", timeout=30).json()
    model = info["models"]["progidiff"]
    assert model["type"] == "segmentation" and model["dimension"] == 3
    assert set(model["labels"]) == set(KNOWN_ORGANS)
    assert model["config"]["num_proposals"] == 3


def test_liver_returns_a_label_in_the_inputs_geometry(server):
    response = infer(server, {"prompt": "liver", "seed": 1})
    assert response.status_code == 200, response.text
    label, result = split_multipart(response)
    source = nib.load(SAMPLE / f"{IMAGE}.nii.gz")
    assert label.shape == source.shape
    assert np.allclose(label.affine, source.affine, atol=1e-4)
    assert result["label_names"] == {"liver": 1}
    assert set(np.unique(np.asarray(label.dataobj))) <= {0, 1}
    stats = result["organ_stats"]["liver"]
    for key in ("proposal_volumes_ml", "mean_pairwise_dice", "dice_to_consensus", "mean_uncertainty", "ranking"):
        assert key in stats
    assert len(stats["proposal_volumes_ml"]) == 3 and sorted(stats["ranking"]) == [0, 1, 2]
    assert result["seed"] == 1 and "latencies" in result
    assert result["proposal_spread"] == 4.0  # the model's own (progidiff_config.json), no conf given


def test_two_organs_and_their_proposals_in_the_datastore(server):
    response = infer(server, {"prompt": "left kidney, spleen", "seed": 2, "num_proposals": 2}, output="json")
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["label_names"] == {"kidney_left": 1, "spleen": 2}  # the returned map: 1..K, as Slicer imports
    assert result["label_values"] == "compact"
    assert result["stored_tags"] == ["consensus", "proposal_0", "proposal_1", "probability", "uncertainty"]
    source = nib.load(SAMPLE / f"{IMAGE}.nii.gz")
    for tag in result["stored_tags"]:
        got = requests.get(f"{server.url}/datastore/label", params={"label": IMAGE, "tag": tag}, timeout=60)
        assert got.status_code == 200, (tag, got.text)
        volume = load_nifti_bytes(got.content)
        assert volume.shape == source.shape
        data = np.asarray(volume.dataobj)
        if tag.startswith("proposal_") or tag == "consensus":
            assert set(np.unique(data)) <= {0, 2, 3}  # stored labels keep the schema's ids
        else:
            assert data.dtype == np.float32 and 0 <= data.min() and data.max() <= 1


def test_seeds_reproduce_and_vary(server):
    a = infer(server, {"prompt": "spleen", "seed": 5}, output="json").json()
    b = infer(server, {"prompt": "spleen", "seed": 5}, output="json").json()
    c = infer(server, {"prompt": "spleen", "seed": 6}, output="json").json()
    assert a["organ_stats"] == b["organ_stats"]
    assert a["organ_stats"]["spleen"]["proposal_volumes_ml"] != c["organ_stats"]["spleen"]["proposal_volumes_ml"]


def test_asking_for_proposal_k_reuses_the_samples(server):
    first = infer(server, {"prompt": "aorta", "seed": 9}, output="json").json()
    response = infer(server, {"prompt": "aorta", "seed": 9, "proposal": 1}, output="all")
    label, result = split_multipart(response)
    assert result["cached"] is True and first["cached"] is False
    assert result["returned"] == "proposal_1"
    stored = requests.get(f"{server.url}/datastore/label", params={"label": IMAGE, "tag": "proposal_1"}, timeout=60)
    stored_aorta = np.asarray(load_nifti_bytes(stored.content).dataobj) == ORGAN_IDS["aorta"]  # schema id there
    assert result["label_names"] == {"aorta": 1}
    assert np.array_equal(np.asarray(label.dataobj) == 1, stored_aorta)


@pytest.mark.parametrize(
    "params, fragment",
    [
        ({"prompt": "livr"}, "Did you mean: liver"),
        ({"prompt": ""}, "Known organs"),
        ({"prompt": "liver", "num_proposals": 0}, "num_proposals"),
        ({"prompt": "liver", "num_proposals": 11}, "from 1 to 10"),
        ({"prompt": "liver", "steps": "many"}, "steps"),
        ({"prompt": "liver", "modality": "PET"}, "modality"),
    ],
)
def test_bad_requests_get_400_with_what_is_accepted(server, params, fragment):
    response = infer(server, params, output="json")
    assert response.status_code == 400, response.text
    assert fragment in response.json()["detail"]


def test_a_request_may_ask_only_for_the_device_the_server_runs_on(server):
    """MONAI Label's `device` option: /info lists the server's one device (Slicer sends it back); another is a 400,
    not silently ignored."""
    listed = requests.get(f"{server.url}/info/", timeout=30).json()["models"]["progidiff"]["config"]["device"]
    assert len(listed) == 1
    assert infer(server, {"prompt": "liver", "device": listed[0]}, output="json").status_code == 200
    response = infer(server, {"prompt": "liver", "device": "tpu"}, output="json")
    assert response.status_code == 400, response.text
    assert f"this server runs on {listed[0]}" in response.json()["detail"]


def test_unknown_prompt_lists_known_organs(server):
    detail = infer(server, {"prompt": "brain tumour"}, output="json").json()["detail"]
    assert all(organ in detail for organ in ("liver", "spleen", "kidney_left"))


def test_dicom_series_end_to_end(server, tmp_path):
    source = nib.load(SAMPLE / f"{IMAGE}.nii.gz")
    folder = write_series(np.asarray(source.dataobj), 3.0, tuple(source.affine[:3, 3]), tmp_path / "dicom")
    response = infer(server, {"prompt": "liver", "seed": 1}, image=str(folder))
    assert response.status_code == 200, response.text
    label, result = split_multipart(response)
    assert label.shape == source.shape
    assert np.allclose(np.abs(np.diag(label.affine))[:3], 3.0, atol=1e-3)
    assert result["modality"] == "CT"  # read from the DICOM header


def datastore_labels(server: Server) -> dict[str, dict]:
    objects = requests.get(f"{server.url}/datastore/", params={"output": "all"}, timeout=60).json()["objects"]
    return {image: obj["labels"] for image, obj in objects.items()}


def batch(server: Server, body: dict) -> requests.Response:
    return requests.post(f"{server.url}/batch/infer/progidiff", params={"run_sync": "true"}, json=body, timeout=900)


def test_batch_inference_labels_every_image_and_resumes_where_it_stopped(server):
    body = {"prompt": "spleen", "num_proposals": 2, "steps": 1, "seed": 11}
    first = batch(server, body)
    assert first.status_code == 200, first.text
    images = sorted(datastore_labels(server))
    assert sorted(first.json()) == images and all("skipped" not in r for r in first.json().values())
    labels = datastore_labels(server)
    for image in images:
        assert labels[image]["consensus"]["info"]["seed"] == 11
        saved = requests.get(f"{server.url}/datastore/label", params={"label": image, "tag": "original"}, timeout=60)
        values = np.unique(np.asarray(load_nifti_bytes(saved.content).dataobj))
        assert set(values.tolist()) <= {0, ORGAN_IDS["spleen"]}  # the schema's value: no viewer renumbers a batch

    again = batch(server, body)  # nothing left to do: every image says it was inferred with these options
    assert all("skipped" in r for r in again.json().values())
    assert {i: labels[i]["consensus"]["info"]["ts"] for i in images} == \
        {i: datastore_labels(server)[i]["consensus"]["info"]["ts"] for i in images}
    other = batch(server, {**body, "seed": 12})
    assert all("skipped" not in r for r in other.json().values())
    assert batch(server, {**body, "prompt": "brain"}).status_code == 400  # checked before the run
