"""Bad input over real HTTP gets a 4xx that says what is wrong, the server stays up, the datastore is unchanged;
concurrent requests give the same answers as sequential ones; a server killed mid-training restarts on the last
published model and adapters."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import nibabel as nib
import numpy as np
import pytest
import requests

from conftest import save_awake_tiny_model, tiny_config, weights_digest
from progidiff.dicom_series import write_series
from progidiff import lora
from progidiff.model import ProGiDiffModel
from server import ROOT, Server, WritesUntilKilled, copy_studies

pytestmark = pytest.mark.server  # starts the real MONAI Label server

SAMPLE = ROOT / "sample-datasets" / "ct"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("robust")
    save_awake_tiny_model(work / "model")
    studies = copy_studies(SAMPLE, work / "studies")
    good = (studies / "phantom_000.nii.gz").read_bytes()
    (studies / "truncated.nii.gz").write_bytes(good[: len(good) // 3])
    nib.save(nib.Nifti1Image(np.zeros((64, 64), np.int16), np.eye(4)), studies / "flat2d.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 8, 3), np.int16), np.eye(4)), studies / "four_d.nii.gz")
    # 300 × 300 × 200 at 1 mm: fine for one organ; for all organs × 10 proposals ~2 GiB, above the limit below.
    nib.save(nib.Nifti1Image(np.full((300, 300, 200), -1000, np.int16), np.eye(4)), studies / "large.nii.gz")
    # DICOM folders that are not one complete series: a slice missing, two series mixed.
    volume = np.asarray(nib.load(studies / "phantom_000.nii.gz").dataobj)[:, :, :12]
    dicom = work / "dicom"
    (write_series(volume, 3.0, (0.0, 0.0, 0.0), dicom / "gap") / "slice_0005.dcm").unlink()
    write_series(volume, 3.0, (0.0, 0.0, 0.0), dicom / "mixed")
    write_series(volume[:, :, :6], 3.0, (0.0, 0.0, 1.5), dicom / "other")
    for file in (dicom / "other").iterdir():
        file.rename(dicom / "mixed" / f"other_{file.name}")
    conf = {"model_path": str(work / "model"), "num_proposals": "2", "steps": "1", "max_memory_gb": "1.5",
            "image_roots": str(dicom)}
    with Server(studies, conf, work) as running:
        yield running


def infer(server: Server, image: str, params: dict | None = None) -> requests.Response:
    return requests.post(f"{server.url}/infer/progidiff", params={"image": image, "output": "json"},
                         files={"params": (None, json.dumps(params or {"prompt": "liver"}))}, timeout=600)


def datastore_state(server: Server) -> dict:
    return requests.get(f"{server.url}/datastore/", params={"output": "all"}, timeout=30).json()


@pytest.mark.parametrize(
    "image, status, fragment",
    [
        ("no_such_image", 404, "no image 'no_such_image'"),
        ("../../etc/passwd", 400, "not a valid image id"),
        ("..%2F..%2Fetc%2Fpasswd", 400, "not a valid image id"),
        ("%2e%2e/%2e%2e/etc/passwd", 400, "not a valid image id"),
        ("/etc/passwd", 403, "not accepted"),
        ("/tmp", 403, "not accepted"),
        ("truncated", 400, "could not read the image"),
        ("flat2d", 400, "3D image"),
        ("four_d", 400, "single-channel 3D image"),
        ("dicom:gap", 400, "misses about 1 slice(s): a gap of 6.0 mm"),
        ("dicom:mixed", 400, "mixes 2 DICOM series"),
    ],
)
def test_bad_images_get_a_clear_4xx(server, image, status, fragment):
    if image.startswith("dicom:"):
        image = str(server.workdir / "dicom" / image.split(":")[1])
    before = datastore_state(server)
    response = infer(server, image)
    assert response.status_code == status, response.text
    assert fragment in response.json()["detail"]
    assert datastore_state(server) == before


@pytest.mark.parametrize(
    "params, fragment",
    [
        ({"prompt": "liver" * 200}, "at most 500 characters"),
        ({"prompt": "liver\x00; rm -rf /"}, "plain text"),
        ({"prompt": "   "}, "Known organs"),
        ({"prompt": "liver", "num_proposals": -1}, "num_proposals"),
        ({"prompt": "liver", "num_proposals": "five"}, "num_proposals"),
        ({"prompt": "liver", "num_proposals": 2.5}, "num_proposals"),
        ({"prompt": "liver", "steps": 0}, "steps"),
        ({"prompt": "liver", "steps": 10**9}, "steps"),
        ({"prompt": "liver", "seed": -1}, "seed"),
        ({"prompt": "liver", "seed": [1]}, "seed"),
        ({"prompt": "liver", "proposal": 7}, "proposal"),
        ({"prompt": "liver", "result_extension": ".exe"}, "'result_extension' must be one of"),
        ({"prompt": "liver", "result_dtype": "complex128"}, "'result_dtype' must be one of"),
        ({"prompt": "liver", "logging": {"level": 1}}, "'logging' must be one of"),
        ({"prompt": "liver", "skip_writer": True}, "'skip_writer' is not supported"),
        ({"prompt": "liver", "result_compress": "maybe"}, "'result_compress' must be true or false"),
    ],
)
def test_bad_parameters_get_400(server, params, fragment):
    response = infer(server, "phantom_000", params)
    assert response.status_code == 400, response.text
    assert fragment in response.json()["detail"]


def test_an_image_too_large_for_the_memory_limit_is_refused_with_the_reason(server):
    response = infer(server, "large", {"prompt": "all organs", "num_proposals": 10})
    assert response.status_code == 400, response.text
    assert "max_memory_gb=1.5" in response.json()["detail"]


@pytest.mark.parametrize(
    "query, upload, fragment",
    [
        ({"image": "not_an_image"}, ("not_an_image.nii.gz", b"hello, this is text"), "not a readable image"),
        ({"image": "../../escape"}, ("escape.nii.gz", None), "is not accepted"),
    ],
)
def test_bad_uploads_are_refused_and_nothing_is_stored(server, query, upload, fragment):
    before = datastore_state(server)
    content = upload[1] if upload[1] is not None else (SAMPLE / "phantom_000.nii.gz").read_bytes()
    response = requests.put(f"{server.url}/datastore/", params=query,
                            files={"file": (upload[0], io.BytesIO(content))}, timeout=60)
    assert response.status_code == 400, response.text
    assert fragment in response.json()["detail"]
    assert datastore_state(server) == before


@pytest.mark.parametrize(
    "query, content, fragment",
    [
        ({"image": "phantom_002", "tag": "final"}, b"\x1f\x8b junk", "not a readable image"),
        ({"image": "phantom_002", "tag": "../../evil"}, None, "label tag"),
        ({"image": "phantom_002", "tag": "final"}, "wrong_shape", "must have its image's shape"),
        ({"image": "nobody", "tag": "final"}, None, "no image 'nobody'"),
        ({"image": "phantom_002", "tag": "final"}, "fractional", "not integers from 0 to 255"),
        ({"image": "phantom_002", "tag": "final"}, "negative", "not integers from 0 to 255"),
        ({"image": "phantom_002", "tag": "final"}, "above_255", "not integers from 0 to 255"),
        ({"image": "phantom_002", "tag": "final"}, "all_nan", "not integers from 0 to 255"),
        ({"image": "phantom_002", "tag": "final"}, "unknown_value", "label values [99] name no organ"),
        ({"image": "phantom_002", "tag": "final"}, "shifted_500mm", "grid differs from image 'phantom_002'"),
    ],
)
def test_bad_labels_are_refused_and_nothing_is_stored(server, tmp_path, query, content, fragment):
    before = datastore_state(server)
    image = nib.load(SAMPLE / "phantom_002.nii.gz")
    liver = np.zeros(image.shape, np.float32)
    liver[40:60, 40:60, 10:20] = 1  # a plausible label map of phantom_002, spoilt below
    spoilt = {"fractional": liver * 0.5, "negative": -liver, "above_255": liver * 300,
              "all_nan": np.full(image.shape, np.nan, np.float32), "unknown_value": liver * 99}
    if content is None:
        content = (SAMPLE / "labels" / "final" / "phantom_000.nii.gz").read_bytes()
    elif content == "wrong_shape":
        content = nib.Nifti1Image(np.zeros((10, 10, 10), np.uint8), np.eye(4)).to_bytes()
    elif content == "shifted_500mm":
        affine = image.affine.copy()
        affine[2, 3] += 500
        content = nib.Nifti1Image(liver.astype(np.uint8), affine).to_bytes()
    elif content in spoilt:
        content = nib.Nifti1Image(spoilt[content], image.affine).to_bytes()
    response = requests.put(f"{server.url}/datastore/label", params=query,
                            files={"label": ("label.nii.gz" if content[:2] == b"\x1f\x8b" else "label.nii",
                                             io.BytesIO(content))}, timeout=60)
    assert response.status_code in (400, 404), response.text
    assert fragment in response.json()["detail"]
    assert datastore_state(server) == before
    assert not list((server.studies.parent).glob("evil*"))


def test_eight_concurrent_requests_match_sequential_answers(server):
    images = ["phantom_000", "phantom_001", "phantom_002"]
    prompts = ["liver", "spleen", "left kidney", "aorta", "liver, spleen", "right kidney"]
    # 12 distinct requests; the result cache keeps the last 4, so the first 8 are sampled again concurrently.
    asked = [(images[i % 3], {"prompt": prompts[i % 6], "seed": i}) for i in range(12)]

    def ask(item):
        response = infer(server, *item)
        assert response.status_code == 200, response.text
        return response.json()

    sequential = [ask(item)["organ_stats"] for item in asked]
    with ThreadPoolExecutor(max_workers=8) as pool:
        concurrent = list(pool.map(ask, asked[:8]))
    assert not any(result["cached"] for result in concurrent)
    assert [result["organ_stats"] for result in concurrent] == sequential[:8]
    assert requests.get(f"{server.url}/info/", timeout=30).status_code == 200


def test_an_image_uploaded_with_the_infer_request_is_accepted(server):
    upload = {"file": ("upload.nii.gz", (SAMPLE / "phantom_000.nii.gz").read_bytes()),
              "params": (None, json.dumps({"prompt": "liver"}))}
    response = requests.post(f"{server.url}/infer/progidiff", params={"output": "json"}, files=upload, timeout=600)
    assert response.status_code == 200, response.text
    assert response.json()["organs"] == ["liver"]


def test_a_file_in_the_temporary_folder_is_not_an_upload(server):
    """Only the file uploaded with this very request is accepted from the temporary folder."""
    with tempfile.NamedTemporaryFile(suffix=".nii.gz", dir=tempfile.gettempdir()) as planted:
        planted.write((SAMPLE / "phantom_000.nii.gz").read_bytes())
        planted.flush()
        response = infer(server, planted.name)
    assert response.status_code == 403, response.text
    assert "not accepted" in response.json()["detail"]


@pytest.mark.parametrize("raw", ["not json", "[1, 2]", "null", "7", "[" * 900 + "]" * 900, "1" * 5000])
def test_params_that_are_not_a_json_object_get_400(server, raw):
    response = requests.post(f"{server.url}/infer/progidiff", params={"image": "phantom_000", "output": "json"},
                             files={"params": (None, raw)}, timeout=60)
    assert response.status_code == 400, response.text
    assert "'params'" in response.json()["detail"] and "JSON object" in response.json()["detail"]


def test_server_killed_during_training_restarts_on_the_last_published_model_and_adapter(tmp_path):
    """SIGKILL the whole server (its training process too) while training publishes every better epoch; a new
    server on the same folders loads the last published model and the MR adapter, and answers."""
    model_dir = save_awake_tiny_model(tmp_path / "models" / "ct")
    adapted = ProGiDiffModel.from_config(tiny_config())
    lora.add_adapter(adapted, "mr", lora.LoraSettings(rank=4))
    lora.save_adapter(adapted, "mr", tmp_path / "models" / "adapters" / "mr", lora.LoraSettings(rank=4))
    studies = copy_studies(SAMPLE, tmp_path / "studies")
    shutil.copy(ROOT / "sample-datasets" / "mr" / "phantom_001_mr.nii.gz", studies)
    conf = {"model_path": str(model_dir), "train_dir": str(tmp_path / "runs"), "num_proposals": "2", "steps": "1"}

    def digest(default: str = "") -> str:
        try:
            return weights_digest(model_dir)
        except FileNotFoundError:  # between the two renames of a publish
            return default

    first = digest()
    with Server(studies, conf, tmp_path) as server:
        try:
            response = requests.post(f"{server.url}/train/progidiff", timeout=60, json={
                "max_epochs": 500, "train_batch_size": 4, "val_proposals": 1, "val_steps": 1, "learning_rate": 1e-3})
            assert response.status_code == 200, response.text
            deadline = time.time() + 300
            while digest(first) == first:  # this run's first publish
                assert time.time() < deadline, f"training did not publish:\n{server.log_tail()}"
                time.sleep(0.5)
            time.sleep(1.7)  # somewhere in a later epoch, perhaps mid-publish
        finally:
            server.kill()

    with Server(studies, conf, tmp_path) as restarted:
        ct = infer(restarted, "phantom_000")
        mr = infer(restarted, "phantom_001_mr")
        assert ct.status_code == 200 and mr.status_code == 200, ct.text + mr.text
        assert (ct.json()["adapter"], mr.json()["adapter"]) == (None, "mr")
        assert requests.get(f"{restarted.url}/train/", timeout=30).json().get("status") != "RUNNING"
    ProGiDiffModel.from_pretrained(model_dir)
    assert digest() != first  # what is served is the model this run published, not the one it started from


def test_acknowledged_label_saves_and_removals_survive_a_server_killed_mid_write(tmp_path):
    """Two clients save labels and remove images while the server is SIGKILLed; the restarted server has every
    acknowledged label byte for byte, no removed image, and a readable index."""
    studies = copy_studies(SAMPLE, tmp_path / "studies")
    for k in range(3):  # images to remove
        shutil.copy(SAMPLE / "phantom_001.nii.gz", studies / f"extra_{k}.nii.gz")
    final = SAMPLE / "labels" / "final" / "phantom_000.nii.gz"
    reference = nib.load(final)
    nib.save(nib.Nifti1Image(np.zeros(reference.shape, np.uint8), reference.affine), tmp_path / "cleared.nii.gz")
    labels = [final.read_bytes(), (tmp_path / "cleared.nii.gz").read_bytes()]
    conf = {"model_path": str(save_awake_tiny_model(tmp_path / "model"))}
    with Server(studies, conf, tmp_path) as server:
        writes = WritesUntilKilled(server, "phantom_000", labels, [f"extra_{k}" for k in range(3)])
        writes.run(kill_after=4.0)
    assert len(writes.saved) >= 3 and writes.removed, "the clients did not get going before the kill"
    with Server(studies, conf, tmp_path) as restarted:
        assert writes.lost_after_restart(restarted) == []


@pytest.mark.parametrize("path, body, status, fragment", [
    ("/scoring/proposal_uncertainty", {"steps": 1000}, 400, "'steps' must be an integer from 1 to 200"),
    ("/scoring/proposal_uncertainty", {"num_proposals": 1}, 400, "'num_proposals' must be an integer from 2"),
    ("/scoring/proposal_uncertainty", {"organs": "livr"}, 400, "Did you mean: liver"),
    ("/scoring/proposal_uncertainty", {"slice_stride": "every"}, 400, "'slice_stride'"),
    ("/scoring/no_such_method", {}, 404, "known: proposal_uncertainty"),
    ("/activelearning/proposal_disagreement", {"steps": 1000}, 400, "'steps' must be an integer from 1 to 200"),
    ("/activelearning/proposal_disagreement", {"organs": ["liver"]}, 400, "'organs' must be a prompt"),
    ("/activelearning/no_such_strategy", {}, 404, "known: proposal_disagreement"),
])
def test_scoring_and_active_learning_options_are_checked_before_any_work(server, path, body, status, fragment):
    response = requests.post(f"{server.url}{path}", json=body, timeout=60)
    assert response.status_code == status, response.text
    assert fragment in response.json()["detail"]


def lying_nifti(shape: tuple[int, ...], zooms: tuple[float, ...] = (1.0, 1.0, 1.0)) -> bytes:
    """A gzip NIfTI whose header declares `shape` but which carries a few bytes of data: a decompression bomb."""
    header = nib.Nifti1Header()
    header.set_data_dtype(np.int16)
    header.set_data_shape(shape)
    header.set_zooms(zooms)
    header["vox_offset"] = 352
    return gzip.compress(header.binaryblock + b"\0" * 4 + b"\0" * 4096, mtime=0)


# The bombs are built in the test: a parameter must be the same on every xdist worker (gzip stamps the time).
@pytest.mark.parametrize("shape, zooms, status, fragment", [
    ((1000, 1000, 1000), (1.0, 1.0, 1.0), 413, "declares 1,000,000,000 voxels"),
    ((100, 100, 50), (30.0, 30.0, 30.0), 400, "declares voxels of (30.0, 30.0, 30.0) mm"),
], ids=["too_many_voxels", "implausible_spacing"])
def test_lying_headers_are_refused_before_anything_is_read(server, shape, zooms, status, fragment):
    content = lying_nifti(shape, zooms)
    before = datastore_state(server)
    as_infer = requests.post(f"{server.url}/infer/progidiff", params={"output": "json"}, timeout=60,
                             files={"file": ("bomb.nii.gz", content), "params": (None, json.dumps({"prompt": "liver"}))})
    as_image = requests.put(f"{server.url}/datastore/", params={"image": "bomb"},
                            files={"file": ("bomb.nii.gz", io.BytesIO(content))}, timeout=60)
    as_label = requests.put(f"{server.url}/datastore/label", params={"image": "phantom_002", "tag": "final"},
                            files={"label": ("bomb.nii.gz", io.BytesIO(content))}, timeout=60)
    for response in (as_infer, as_image, as_label):
        assert response.status_code == status, response.text
        assert fragment in response.json()["detail"]
    assert datastore_state(server) == before


def test_a_malformed_stored_score_does_not_break_active_learning(server):
    response = requests.put(f"{server.url}/datastore/image/info", params={"image": "phantom_002"},
                            files={"info": (None, json.dumps({"proposal_uncertainty": "garbage"}))}, timeout=60)
    assert response.status_code == 200, response.text
    response = requests.post(f"{server.url}/activelearning/proposal_disagreement",
                             json={"num_proposals": 2, "steps": 1, "slice_stride": 20}, timeout=600)
    assert response.status_code == 200, response.text
    info = requests.get(f"{server.url}/datastore/image/info", params={"image": "phantom_002"}, timeout=30).json()
    assert isinstance(info["proposal_uncertainty"]["score"], float)  # scored anew


@pytest.mark.parametrize("method, path, params, status, fragment", [
    ("DELETE", "/datastore/", {"id": "no_such_image"}, 404, "no image 'no_such_image'"),
    ("DELETE", "/datastore/label", {"id": "phantom_002", "tag": "no_such_tag"}, 404, "has no label 'no_such_tag'"),
    ("POST", "/infer/no_such_model", {"image": "phantom_000"}, 404, "this server serves: progidiff"),
])
def test_unknown_things_get_404_not_500(server, method, path, params, status, fragment):
    response = requests.request(method, f"{server.url}{path}", params=params, timeout=60,
                                files={"params": (None, "{}")} if method == "POST" else None)
    assert response.status_code == status, response.text
    assert fragment in response.json()["detail"]


def test_nan_voxels_get_400(server, tmp_path):
    volume = np.full((40, 40, 10), 40.0, np.float32)
    volume[5, 5, 5] = np.nan
    path = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.diag([3.0, 3.0, 3.0, 1.0])), path)
    response = requests.post(f"{server.url}/infer/progidiff", params={"output": "json"}, timeout=60,
                             files={"file": ("nan.nii.gz", path.read_bytes()), "params": (None, "{}")})
    assert response.status_code == 400, response.text
    assert "NaN or infinite" in response.json()["detail"]


def test_reuploading_an_id_with_another_image_drops_its_labels(server, tmp_path):
    """A different image under an existing id would otherwise inherit the old image's final label (and
    training would fail on a shape mismatch); the same image uploaded again keeps its labels."""
    first = (SAMPLE / "phantom_000.nii.gz").read_bytes()
    label = (SAMPLE / "labels" / "final" / "phantom_000.nii.gz").read_bytes()
    for content in (first, first):
        assert requests.put(f"{server.url}/datastore/", params={"image": "reused"},
                            files={"file": ("reused.nii.gz", io.BytesIO(content))}, timeout=60).status_code == 200
        if content is first and "final" not in datastore_state(server)["objects"]["reused"]["labels"]:
            saved = requests.put(f"{server.url}/datastore/label", params={"image": "reused", "tag": "final"},
                                 files={"label": ("label.nii.gz", io.BytesIO(label))}, timeout=60)
            assert saved.status_code == 200, saved.text
    assert "final" in datastore_state(server)["objects"]["reused"]["labels"]  # the same image: label kept
    other = nib.load(SAMPLE / "phantom_001.nii.gz")
    nib.save(other, tmp_path / "reused.nii")  # another image, another extension
    assert requests.put(f"{server.url}/datastore/", params={"image": "reused"},
                        files={"file": ("reused.nii", io.BytesIO((tmp_path / "reused.nii").read_bytes()))},
                        timeout=60).status_code == 200
    entry = datastore_state(server)["objects"]["reused"]
    assert entry["labels"] == {} and entry["image"]["ext"] == ".nii"
    assert sorted(p.name for p in server.studies.glob("reused*")) == ["reused.nii"]
    assert not list(server.studies.glob("labels/*/reused*"))


@pytest.mark.parametrize("options", [{"result_compress": 0}, {"skip_writer": 0}, {"logging": ""}, {"logging": None},
                                     {"logging": "debug"}])
def test_monai_label_options_in_other_types_are_taken_as_meant(server, options):
    response = infer(server, "phantom_000", {"prompt": "liver", **options})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("task, body, fragment", [
    ("progidiff", {"val_split": 7}, "'val_split' must be a number from 0 to 0.9"),
    ("progidiff", {"max_epochs": -1}, "'max_epochs' must be an integer from 1"),
    ("progidiff", {"max_epochs": 2.5}, "'max_epochs' must be an integer"),
    ("progidiff", {"learning_rate": "abc"}, "'learning_rate' must be a number"),
    ("progidiff", {"name": "../x"}, "run name"),
    ("progidiff_mr_lora", {"base_attention": "maybe"}, "'base_attention' must be true or false"),
    ("progidiff_mr_lora", {"phantoms": 100}, "'phantoms' must be an integer from 0 to 64"),
    ("progidiff", {"real_weight": 0}, "'real_weight' must be a number from 0.05 to 1"),
    ("progidiff", {"contrast_rate": 1.5}, "'contrast_rate' must be a number from 0 to 1"),
    ("progidiff", {"pancreas_fat": 0.95}, "'pancreas_fat' must be a number from 0 to 0.89"),
    ("progidiff_mr_lora", {"publish_margin": "small"}, "'publish_margin' must be a number from 0 to 1"),
])
def test_train_options_are_checked_before_a_run_starts(server, task, body, fragment):
    response = requests.post(f"{server.url}/train/{task}", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert fragment in response.json()["detail"]
    assert requests.get(f"{server.url}/train/", timeout=30).json().get("status") != "RUNNING"
    assert requests.post(f"{server.url}/train/no_such_task", json={}, timeout=60).status_code == 404


def test_an_image_upload_with_nan_voxels_is_refused(server, tmp_path):
    volume = np.full((40, 40, 10), 40.0, np.float32)
    volume[1, 2, 3] = np.inf
    before = datastore_state(server)
    response = requests.put(f"{server.url}/datastore/", params={"image": "nan_upload"},
                            files={"file": ("nan_upload.nii", io.BytesIO(nib.Nifti1Image(volume, np.eye(4)).to_bytes()))},
                            timeout=60)
    assert response.status_code == 400 and "NaN or infinite" in response.json()["detail"], response.text
    assert datastore_state(server) == before
