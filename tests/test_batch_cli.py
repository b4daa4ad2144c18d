"""`python -m progidiff.batch`: a folder of studies on two CPU workers, resumable, unreadable studies reported."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from conftest import save_awake_tiny_model
from progidiff import batch, segment
from progidiff.phantoms import make_phantom

OPTIONS = ["--prompt", "liver, spleen", "--proposals", "2", "--steps", "1"]


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """Three small studies (a few slices of phantoms), one file that is no image, and a tiny model."""
    root = tmp_path_factory.mktemp("archive")
    studies = root / "studies"
    studies.mkdir()
    for seed in (40, 41, 42):
        p = make_phantom(seed, slice_mm=5.0)
        z = p.ct.shape[2] // 2
        nib.save(nib.Nifti1Image(p.ct[:, :, z - 2 : z + 2], p.affine), studies / f"study_{seed}.nii.gz")
    (studies / "broken.nii.gz").write_bytes(b"not a NIfTI file")
    return studies, save_awake_tiny_model(root / "model")


def run(archive, out, *extra):
    studies, model = archive
    return batch.main(["--model", str(model), "--images", str(studies), "--out", str(out), *OPTIONS, *extra])


def statuses(report: dict) -> dict[str, str]:
    return {r["study"]: r["status"] for r in report["studies"]}


def test_two_workers_segment_every_study_and_a_second_run_skips_them(archive, tmp_path):
    out = tmp_path / "results"
    first = run(archive, out, "--devices", "cpu,cpu", "--threads", "2")
    assert statuses(first) == {"study_40": "done", "study_41": "done", "study_42": "done", "broken": "failed"}
    assert {r["device"] for r in first["studies"] if r["status"] == "done"} == {"cpu"}
    assert "broken.nii.gz" in next(r["error"] for r in first["studies"] if r["study"] == "broken")
    assert json.loads((out / "batch.json").read_text())["studies"] == first["studies"]
    # each result is what a single `segment` run of the same study gives
    single = segment.main(["--model", str(archive[1]), "--image", str(archive[0] / "study_41.nii.gz"),
                           "--out", str(tmp_path / "single"), *OPTIONS])
    assert json.loads((out / "study_41" / "summary.json").read_text())["organs"] == single["organs"]
    batched = np.asarray(nib.load(out / "study_41" / "consensus.nii.gz").dataobj)
    alone = np.asarray(nib.load(tmp_path / "single" / "consensus.nii.gz").dataobj)
    assert batched.shape == alone.shape and (batched == alone).mean() > 0.999

    again = run(archive, out)
    assert statuses(again) == {"study_40": "skipped", "study_41": "skipped", "study_42": "skipped", "broken": "failed"}


def test_other_options_or_force_redo_a_study(archive, tmp_path):
    out = tmp_path / "results"
    run(archive, out)
    assert set(statuses(run(archive, out, "--seed", "1")).values()) == {"done", "failed"}  # another seed
    assert statuses(run(archive, out, "--seed", "1", "--force"))["study_40"] == "done"
    assert statuses(run(archive, out, "--seed", "1"))["study_40"] == "skipped"


def test_a_study_whose_summary_is_missing_is_redone(archive, tmp_path):
    """A run killed before a study's summary was written left the study incomplete: it is not taken as done."""
    out = tmp_path / "results"
    run(archive, out)
    (out / "study_42" / "summary.json").unlink()
    assert statuses(run(archive, out)) == {"study_40": "skipped", "study_41": "skipped", "study_42": "done",
                                           "broken": "failed"}


def test_an_unknown_prompt_stops_before_any_work(archive, tmp_path):
    studies, model = archive
    with pytest.raises(SystemExit, match="gizzard"):
        batch.main(["--model", str(model), "--images", str(studies), "--out", str(tmp_path), "--prompt", "gizzard"])
    assert not any(tmp_path.iterdir())
