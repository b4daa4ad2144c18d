"""A real PACS: Orthanc with DICOMweb (scripts/pacs.sh), the server on it offline, proposals and labels as SEG;
two servers on one PACS side by side."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor

import nibabel as nib
import numpy as np
import pydicom
import pytest
import requests
from monai.transforms import LoadImage

from progidiff.dicom_seg import SegSeries, write_dicom_seg
from progidiff.labels import ORGAN_IDS
from progidiff.terminology import ORGAN_TERMS
from server import ROOT, Server, free_port

pytestmark = pytest.mark.server  # starts Orthanc and the real MONAI Label server
# A test below runs two servers side by side on this machine's 2 cores: one torch thread each, or their OpenMP
# teams wait for each other's cores at every operation (that test: 100 s with every core each, 41-47 s like this).
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """Orthanc on loopback holding a CT series of each sample phantom; stopped by its PID afterwards."""
    folder = tmp_path_factory.mktemp("pacs")
    ports = {"ORTHANC_HTTP_PORT": str(free_port()), "ORTHANC_DICOM_PORT": str(free_port())}
    started = subprocess.run(["bash", str(ROOT / "scripts" / "pacs.sh"), "start", str(folder)], capture_output=True,
                             text=True, env={**os.environ, **ports}, timeout=900)
    assert started.returncode == 0, started.stdout + started.stderr
    url = f"http://127.0.0.1:{ports['ORTHANC_HTTP_PORT']}"
    yield url
    subprocess.run(["bash", str(ROOT / "scripts" / "pacs.sh"), "stop", str(folder)], timeout=60)


@pytest.fixture(scope="module")
def server(pacs, tmp_path_factory):
    work = tmp_path_factory.mktemp("dicomweb")
    conf = {"model_path": str(ROOT / "model" / "progidiff_ct"), "num_proposals": "2", "steps": "1",
            "train_dir": str(work / "runs")}
    env = {"MONAI_LABEL_DICOMWEB_CACHE_PATH": str(work / "cache"), **ONE_THREAD}
    with Server(f"{pacs}/dicom-web", conf, work, env=env) as running:
        yield running


def series_of(pacs: str, description: str) -> str:
    for series in requests.get(f"{pacs}/series", params={"expand": ""}, timeout=30).json():
        if series["MainDicomTags"].get("SeriesDescription") == description:
            return series["MainDicomTags"]["SeriesInstanceUID"]
    raise AssertionError(f"no series {description!r} in the PACS")


def seg_datasets(pacs: str) -> dict[str, pydicom.Dataset]:
    """SeriesDescription → the SEG instance, for every SEG series in the PACS."""
    found = {}
    for series in requests.get(f"{pacs}/series", params={"expand": ""}, timeout=30).json():
        if series["MainDicomTags"].get("Modality") == "SEG":
            instance = series["Instances"][0]
            content = requests.get(f"{pacs}/instances/{instance}/file", timeout=30).content
            found[series["MainDicomTags"]["SeriesDescription"]] = pydicom.dcmread(io.BytesIO(content))
    return found


def test_the_server_lists_the_pacs_studies_before_any_infer(server, pacs):
    listing = requests.get(f"{server.url}/datastore/", params={"output": "all"}, timeout=60).json()
    assert series_of(pacs, "phantom_000") in listing["objects"] and len(listing["objects"]) == 3
    assert requests.get(f"{server.url}/datastore/", timeout=60).json()["total"] == 3


def test_consensus_and_proposals_reach_the_pacs_as_coded_coloured_seg(server, pacs):
    image = series_of(pacs, "phantom_000")
    response = requests.post(f"{server.url}/infer/progidiff", params={"image": image, "output": "json"},
                             files={"params": (None, json.dumps({"prompt": "left kidney, spleen"}))}, timeout=600)
    assert response.status_code == 200, response.text
    segs = seg_datasets(pacs)
    consensus = [d for name, d in segs.items() if name.startswith("ProGiDiff consensus of 2 | seed 0 | model ")]
    proposals = sorted(name for name in segs if name.startswith("ProGiDiff proposal "))
    assert len(consensus) == 1 and [p[:27] for p in proposals] == ["ProGiDiff proposal 1 of 2 |",
                                                                    "ProGiDiff proposal 2 of 2 |"]
    assert "tightest" in segs[proposals[0]].ContentDescription
    segments = {s.SegmentLabel: s for s in consensus[0].SegmentSequence}
    assert set(segments) == {"kidney_left", "spleen"}
    kidney, spleen = segments["kidney_left"], segments["spleen"]
    assert spleen.SegmentedPropertyTypeCodeSequence[0].CodeValue == "78961009"
    assert kidney.SegmentedPropertyTypeCodeSequence[0].CodeValue == ORGAN_TERMS["kidney_left"].code[0]
    assert kidney.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning == "Left"
    assert list(kidney.RecommendedDisplayCIELabValue) != list(spleen.RecommendedDisplayCIELabValue)
    assert consensus[0].ReferencedSeriesSequence[0].SeriesInstanceUID == image

    again = requests.post(f"{server.url}/infer/progidiff", params={"image": image, "output": "json"},
                          files={"params": (None, json.dumps({"prompt": "left kidney, spleen", "proposal": 1}))},
                          timeout=600)
    assert again.status_code == 200 and again.json()["cached"], again.text
    assert len(seg_datasets(pacs)) == len(segs)  # a cached answer is not sent to the PACS twice


def test_a_corrected_proposal_saved_as_final_reaches_the_pacs_and_training(server, pacs):
    """The annotator's loop: take a proposal, correct it, save it as the final label; the PACS gets a SEG, and
    the training list holds that label (the app's own proposal SEG never count as labels)."""
    image = series_of(pacs, "phantom_001")
    response = requests.post(f"{server.url}/infer/progidiff", params={"image": image, "output": "json"},
                             files={"params": (None, json.dumps({"prompt": "liver"}))}, timeout=600)
    assert response.status_code == 200, response.text
    assert requests.get(f"{server.url}/datastore/", params={"output": "train"}, timeout=60).json() == []

    proposal = requests.get(f"{server.url}/datastore/label", params={"label": image, "tag": "proposal_1"}, timeout=60)
    assert proposal.status_code == 200, proposal.text
    corrected = nib.Nifti1Image.from_bytes(gzip.decompress(proposal.content))
    data = np.asarray(corrected.dataobj).copy()
    data[:, :, :2] = 0  # the annotator erases the two lowest slices
    buffer = io.BytesIO(nib.Nifti1Image(data, corrected.affine).to_bytes())
    saved = requests.put(f"{server.url}/datastore/label", params={"image": image, "tag": "final"},
                         files={"label": ("final.nii", buffer),
                                "params": (None, json.dumps({"label_info": [{"name": "Liver", "idx": ORGAN_IDS["liver"]}]}))},
                         timeout=120)
    assert saved.status_code == 200, saved.text
    final = seg_datasets(pacs)["Final label"]
    assert [s.SegmentLabel for s in final.SegmentSequence] == ["liver"]
    assert final.SegmentSequence[0].SegmentAlgorithmType == "SEMIAUTOMATIC"

    pairs = requests.get(f"{server.url}/datastore/", params={"output": "train"}, timeout=60).json()
    assert [os.path.basename(p["image"]) for p in pairs] == [f"{image}.nii.gz"]
    stored = np.asarray(nib.load(pairs[0]["label"]).dataobj)
    assert np.array_equal(stored, data)


def test_a_final_seg_from_another_tool_is_read_into_the_schema(server, pacs, tmp_path):
    """A viewer's own SEG export numbers its segments 1..K: the trainer gets them as organs by their names."""
    image = series_of(pacs, "phantom_002")
    series_dir = tmp_path / "series"
    ids = requests.get(f"{pacs}/series", params={"expand": ""}, timeout=30).json()
    orthanc_id = next(s["ID"] for s in ids if s["MainDicomTags"]["SeriesInstanceUID"] == image)
    series_dir.mkdir()
    for k, instance in enumerate(requests.get(f"{pacs}/series/{orthanc_id}/instances", timeout=30).json()):
        (series_dir / f"{k:03d}.dcm").write_bytes(requests.get(f"{pacs}/instances/{instance['ID']}/file", timeout=30).content)
    scan = nib.load(ROOT / "sample-datasets" / "ct" / "phantom_002.nii.gz")
    spleen_as_one = np.zeros(scan.shape, np.uint8)
    spleen_as_one[70:90, 40:60, 10:20] = 1  # a block drawn as segment 1, named "spleen"
    nib.save(nib.Nifti1Image(spleen_as_one, scan.affine), tmp_path / "label.nii.gz")
    seg = write_dicom_seg(tmp_path / "label.nii.gz", series_dir, {"spleen": 1},
                          SegSeries("Edited in a viewer", "EDIT", automatic=False), tmp_path / "seg.dcm")
    assert requests.post(f"{pacs}/instances", data=seg.read_bytes(), timeout=60).status_code == 200

    pairs = requests.get(f"{server.url}/datastore/", params={"output": "train"}, timeout=120).json()
    pair = next(p for p in pairs if os.path.basename(p["image"]).startswith(image))
    label = LoadImage(image_only=True)(pair["label"])
    assert set(np.unique(np.asarray(label)).tolist()) == {0, ORGAN_IDS["spleen"]}


def seg_fingerprints(pacs: str) -> dict[str, str]:
    """SOPInstanceUID → SHA-256 of the file, for every SEG instance in the PACS."""
    found = {}
    for series in requests.get(f"{pacs}/series", params={"expand": ""}, timeout=30).json():
        if series["MainDicomTags"].get("Modality") == "SEG":
            for instance in series["Instances"]:
                content = requests.get(f"{pacs}/instances/{instance}/file", timeout=30).content
                found[pydicom.dcmread(io.BytesIO(content)).SOPInstanceUID] = hashlib.sha256(content).hexdigest()
    return found


def test_two_servers_on_one_pacs_infer_side_by_side_without_touching_each_others_labels(server, pacs, tmp_path):
    """Two annotators, each with a server (its own cache), one PACS: infers on the same study at the same time
    both reach the PACS as their own SEG series; every SEG that was there before is still there, unchanged."""
    image = series_of(pacs, "phantom_002")
    before = seg_fingerprints(pacs)
    conf = {**server.conf, "train_dir": str(tmp_path / "runs")}
    env = {"MONAI_LABEL_DICOMWEB_CACHE_PATH": str(tmp_path / "cache"), **ONE_THREAD}
    with Server(server.studies, conf, tmp_path, env=env) as other:
        with ThreadPoolExecutor(max_workers=2) as pool:
            answers = list(pool.map(
                lambda pair: requests.post(f"{pair[0].url}/infer/progidiff", params={"image": image, "output": "json"},
                                           files={"params": (None, json.dumps({"prompt": "liver", "seed": pair[1]}))},
                                           timeout=600),
                [(server, 21), (other, 22)]))
    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    after = seg_fingerprints(pacs)
    assert {uid: after.get(uid) for uid in before} == before  # nothing either server wrote replaced another SEG
    segs = seg_datasets(pacs)
    for seed in (21, 22):
        consensus = [d for name, d in segs.items() if name.startswith(f"ProGiDiff consensus of 2 | seed {seed} |")]
        assert len(consensus) == 1 and consensus[0].ReferencedSeriesSequence[0].SeriesInstanceUID == image
