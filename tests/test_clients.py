"""3D Slicer and OHIF against the real server with the default model: each client's own import rule
(`tests/clients.py`, replayed from their code) puts every organ in its own segment, checked against the
phantom's reference label; Slicer's volume names and sessions work; the server answers while it samples."""

from __future__ import annotations

import json
import threading
import time

import nibabel as nib
import nrrd
import numpy as np
import pytest
import requests
import SimpleITK as sitk
from monailabel.client import MONAILabelClient

from clients import (
    SLICER_INFER_PARAMS,
    ohif_infer,
    ohif_model_labels,
    ohif_segments,
    slicer_seg_nrrd_segments,
    slicer_segments,
)
from progidiff import segment
from progidiff.labels import ORGAN_IDS
from progidiff.metrics import dice
from server import ROOT, Server

pytestmark = pytest.mark.server  # starts the real MONAI Label server

MODEL = "progidiff"
IMAGE = "crop"
# Organs the default model finds on the crop (consensus Dice 0.82-0.93 there), big enough to judge a segment by.
JUDGED = ("liver", "spleen", "kidney_left", "kidney_right")
MIN_DICE = 0.6


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The default model on six axial slices of a sample study (liver, spleen and both kidneys all present)."""
    work = tmp_path_factory.mktemp("clients")
    studies = work / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    image = nib.load(ROOT / "sample-datasets" / "ct" / "phantom_000.nii.gz")
    label = nib.load(ROOT / "sample-datasets" / "ct" / "labels" / "final" / "phantom_000.nii.gz")
    reference = np.asarray(label.dataobj).astype(np.uint8)
    area = np.stack([(reference == ORGAN_IDS[o]).sum(axis=(0, 1)) for o in JUDGED])  # [organ, z]
    first = int(np.argmax([area[:, z : z + 6].sum(axis=1).min() for z in range(reference.shape[2] - 5)]))
    affine = image.affine.copy()
    affine[:3, 3] += affine[:3, 2] * first  # the six slices where the judged organs are largest together
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[:, :, first : first + 6], affine), studies / f"{IMAGE}.nii.gz")
    nib.save(nib.Nifti1Image(reference[:, :, first : first + 6], affine), work / "reference.nii.gz")
    conf = {"model_path": str(ROOT / "model" / "progidiff_ct"), "num_proposals": "2", "train_dir": str(work / "runs")}
    with Server(studies, conf, work) as running:
        running.reference = sitk.ReadImage(str(work / "reference.nii.gz"))
        yield running


def reference_mask(server: Server, organ: str) -> np.ndarray:
    return sitk.GetArrayFromImage(server.reference) == ORGAN_IDS[organ]


def assert_each_segment_holds_its_organ(server: Server, segments: dict[str, np.ndarray], wanted: list[str]) -> None:
    """Every wanted organ has a segment of its name; each judged one overlaps its own reference organ, and
    better than any other organ's (a segment holding the wrong organ fails here)."""
    assert set(wanted) <= set(segments), f"segments {sorted(segments)}; wanted {wanted}"
    for organ in [o for o in wanted if o in JUDGED]:
        scores = {other: dice(segments[organ], reference_mask(server, other)) for other in JUDGED}
        assert scores[organ] >= MIN_DICE, f"segment {organ!r}: Dice to each reference organ {scores}"
        assert max(scores, key=scores.get) == organ, f"segment {organ!r} holds another organ: {scores}"


def slicer_client(server: Server, tmp_path) -> MONAILabelClient:
    return MONAILabelClient(server.url, tmpdir=str(tmp_path))


def slicer_options(info: dict) -> dict:
    """`getParamsFromConfig("infer", model)`: every option of the model's table, as shown."""
    return dict(info["models"][MODEL]["config"])


def test_info_has_the_shape_ohif_reads(server):
    info = requests.get(f"{server.url}/info/", timeout=30).json()
    assert isinstance(info["labels"], list) and info["labels"][:2] == ["liver", "spleen"]  # panel calls .push
    model = info["models"][MODEL]
    assert model["type"] == "segmentation"  # listed in Auto-Segmentation and Class Prompts
    assert ohif_model_labels(info, MODEL) == ORGAN_IDS


@pytest.mark.parametrize("prompt, organs", [
    ("spleen", ["spleen"]),
    ("left kidney, spleen", ["kidney_left", "spleen"]),
    ("all organs", list(ORGAN_IDS)),
])
def test_slicer_puts_every_organ_in_its_own_segment(server, tmp_path, prompt, organs):
    client = slicer_client(server, tmp_path)
    info = client.info()
    params = {**slicer_options(info), "prompt": prompt, **SLICER_INFER_PARAMS}
    result_file, result = client.infer(MODEL, IMAGE, params)
    assert sorted(result["label_names"].values()) == list(range(1, len(organs) + 1))
    segments = slicer_segments(result_file, result, info["models"][MODEL], server.reference)
    assert sorted(segments) == sorted(organs)
    assert_each_segment_holds_its_organ(server, segments, organs)


@pytest.mark.parametrize("ticked", [["spleen"], ["kidney_left", "spleen"], list(ORGAN_IDS)])
def test_ohif_class_prompts_put_every_ticked_organ_in_its_own_segment(server, tmp_path, ticked):
    info = requests.get(f"{server.url}/info/", timeout=30).json()
    index = ohif_model_labels(info, MODEL)
    response = ohif_infer(server.url, MODEL, IMAGE, {"label_prompt": [index[o] for o in ticked]})
    assert response.status_code == 200, response.text
    segments = ohif_segments(response.content, tmp_path, info, MODEL, ticked, server.reference)
    assert_each_segment_holds_its_organ(server, segments, ticked)


def test_ohif_auto_segmentation_with_an_edited_prompt(server, tmp_path):
    info = requests.get(f"{server.url}/info/", timeout=30).json()
    response = ohif_infer(server.url, MODEL, IMAGE, {"prompt": "left kidney, spleen"})
    assert response.status_code == 200, response.text
    every_label = sorted(ohif_model_labels(info, MODEL))  # Auto-Segmentation maps every model label
    segments = ohif_segments(response.content, tmp_path, info, MODEL, every_label, server.reference)
    assert_each_segment_holds_its_organ(server, segments, ["kidney_left", "spleen"])
    assert not segments["liver"].any()  # not asked for: nothing


def test_a_label_prompt_that_is_no_model_label_gets_400(server):
    response = ohif_infer(server.url, MODEL, IMAGE, {"label_prompt": [999]})
    assert response.status_code == 400
    assert "no label of this model" in response.json()["detail"] and "liver=1" in response.json()["detail"]


def test_slicer_gets_the_proposals_as_overlapping_segments(server, tmp_path):
    client = slicer_client(server, tmp_path)
    info = client.info()
    params = {**slicer_options(info), "prompt": "spleen", "num_proposals": 3, "proposal_layers": True,
              **SLICER_INFER_PARAMS}
    result_file, result = client.infer(MODEL, IMAGE, params)
    assert result_file.endswith(".seg.nrrd")  # the module loads it whole (file extension setting .seg.nrrd)
    layers = slicer_seg_nrrd_segments(result_file)
    names = ["spleen", "spleen - proposal 1 of 3", "spleen - proposal 2 of 3", "spleen - proposal 3 of 3"]
    assert list(layers) == names == result["segments"]
    assert dice(layers["spleen"], layers["spleen - proposal 2 of 3"]) > 0.5
    # the same request without layers: proposal 2 comes back from the cache, equal to its layer
    plain = {**params, "proposal_layers": False, "proposal": 1}
    proposal_file, proposal = client.infer(MODEL, IMAGE, plain)
    assert proposal["cached"] and proposal["returned"] == "proposal_1"
    data, _ = nrrd.read(proposal_file)
    assert np.array_equal(data == 1, layers["spleen - proposal 2 of 3"])


def test_a_slicer_volume_name_is_uploaded_inferred_and_labelled(server, tmp_path):
    """Slicer uploads a volume under its node name ("5: CT ABDOMEN"), then infers and saves under that name."""
    client = slicer_client(server, tmp_path)
    name = "5: CT ABDOMEN"
    volume = tmp_path / "volume.nii.gz"
    volume.write_bytes((server.studies / f"{IMAGE}.nii.gz").read_bytes())
    stored_id = client.upload_image(str(volume), name)["image"]
    assert stored_id.startswith("5_CT_ABDOMEN-")
    result_file, result = client.infer(MODEL, name, {"prompt": "liver", **SLICER_INFER_PARAMS})
    assert result["label_names"] == {"liver": 1} and "proposal_0" in result["stored_tags"]
    saved = client.save_label(name, result_file, params={"label_info": [{"name": "liver", "idx": 1}]})
    assert saved["image"] == name
    listing = requests.get(f"{server.url}/datastore/", params={"output": "all"}, timeout=30).json()
    assert "final" in listing["objects"][stored_id]["labels"]
    assert requests.get(f"{server.url}/datastore/label", params={"label": name, "tag": "final"},
                        timeout=30).status_code == 200


def test_a_slicer_session_is_inferred(server, tmp_path):
    client = slicer_client(server, tmp_path)
    session_id = client.create_session(str(server.studies / f"{IMAGE}.nii.gz"))["session_id"]
    _, result = client.infer(MODEL, "", {"prompt": "spleen", **SLICER_INFER_PARAMS}, session_id=session_id)
    _, again = client.infer(MODEL, "", {"prompt": "spleen", "proposal": 1, **SLICER_INFER_PARAMS},
                            session_id=session_id)
    assert not result["cached"] and again["cached"]


def test_the_command_line_samples_as_the_server_does(server, tmp_path):
    """`progidiff.segment` with no sampling options gives the server's answer to a request with none: the
    server, `segment` and `batch` share one default (steps, seed, scheduler, spread, slice screening)."""
    response = requests.post(f"{server.url}/infer/{MODEL}", params={"image": IMAGE, "output": "json"},
                             files={"params": (None, json.dumps({"prompt": "spleen"}))}, timeout=600)
    assert response.status_code == 200, response.text
    result = response.json()
    served = requests.get(f"{server.url}/datastore/label", params={"label": IMAGE, "tag": "consensus"}, timeout=60)
    assert served.status_code == 200
    (tmp_path / "served.nii.gz").write_bytes(served.content)
    summary = segment.main(["--model", str(ROOT / "model" / "progidiff_ct"), "--prompt", "spleen",
                            "--image", str(server.studies / f"{IMAGE}.nii.gz"), "--out", str(tmp_path / "cli"),
                            "--proposals", str(result["num_proposals"])])  # the server's conf num_proposals
    assert (summary["steps"], summary["seed"]) == (result["steps"], result["seed"])
    by_server = np.asarray(nib.load(tmp_path / "served.nii.gz").dataobj) > 0
    by_command = np.asarray(nib.load(tmp_path / "cli" / "consensus.nii.gz").dataobj) > 0
    assert by_server.any() and by_server.shape == by_command.shape
    assert dice(by_server, by_command) > 0.99


def _latencies_while(server: Server, work) -> list[float]:
    """Seconds `/info` and `/datastore` take, asked every 0.25 s while `work` runs in another thread."""
    thread = threading.Thread(target=work)
    thread.start()
    time.sleep(0.5)
    latencies = []
    while thread.is_alive():
        for path in ("/info/", "/datastore/"):
            start = time.perf_counter()
            assert requests.get(f"{server.url}{path}", timeout=60).status_code == 200
            latencies.append(time.perf_counter() - start)
        time.sleep(0.25)
    thread.join()
    return latencies


def test_the_server_answers_while_it_samples_and_scores(server):
    """While an infer or an active-learning request samples, `/info` and `/datastore` answer within 1 s."""
    def all_organs():
        response = requests.post(f"{server.url}/infer/{MODEL}", params={"image": IMAGE, "output": "json"},
                                 files={"params": (None, json.dumps({"prompt": "all organs", "seed": 5}))},
                                 timeout=600)
        assert response.status_code == 200, response.text

    def next_sample():
        response = requests.post(f"{server.url}/activelearning/proposal_disagreement",
                                 json={"organs": "all organs", "slice_stride": 1, "num_proposals": 2, "steps": 1}, timeout=600)
        assert response.status_code == 200, response.text

    for work in (all_organs, next_sample):
        latencies = _latencies_while(server, work)
        assert np.percentile(latencies, 95) < 1.0, f"{work.__name__}: latencies {latencies}"
        assert len(latencies) >= 4, "the work ended before the server was asked: nothing was measured"
