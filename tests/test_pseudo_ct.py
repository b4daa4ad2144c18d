"""Pseudo-CT: a labelled MR rendered as CT keeps its anatomy and reads as CT of a drawn contrast phase."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED_DATA, requires_shared_data, save_awake_tiny_model
from progidiff import contrast, train
from progidiff.data import Volume, load_volume_pair
from progidiff.labels import ORGAN_IDS
from progidiff.phantoms import make_phantom
from progidiff.pseudo_ct import pseudo_ct_volumes, render, signal_of_muscle_and_fat

ROOT = Path(__file__).resolve().parents[1]


def median_inside(volume: Volume, organ: str) -> float:
    return float(np.median(volume.image[volume.label == ORGAN_IDS[organ]]))


def phase_of(volume: Volume) -> str:
    return next(phase for phase in contrast.PHASES if f"pseudo-CT {phase} " in volume.name)


def test_muscle_and_fat_signal_are_the_two_modes_not_the_extremes():
    rng = np.random.default_rng(0)
    signal = np.concatenate([rng.normal(15, 5, 4000), rng.normal(400, 60, 6000), rng.uniform(600, 900, 500)])
    muscle, fat = signal_of_muscle_and_fat(signal)
    assert muscle == pytest.approx(15, abs=3) and fat == pytest.approx(405, abs=20)


def test_a_phantom_mr_rendered_as_ct_reads_as_ct_of_its_drawn_phase():
    phantom = make_phantom(5)
    mr = Volume(phantom.mr.astype(np.float32), phantom.label, "phantom_5_mr", (3.0, 3.0, 3.0))
    renderings = pseudo_ct_volumes(mr, 6, seed=20)
    again = pseudo_ct_volumes(mr, 1, seed=20)[0]
    np.testing.assert_allclose(renderings[0].image, again.image, atol=1e-3)
    assert not np.allclose(renderings[0].image, renderings[1].image)
    for volume in renderings:
        assert np.array_equal(volume.label, mr.label) and not volume.unenhanced_ct
        outside = volume.image[0, 0, :]
        assert outside.max() < -900  # air around the body
        fat_or_muscle = volume.image[(volume.label == 0) & (phantom.ct > -120) & (phantom.ct < -80)]
        assert np.median(fat_or_muscle) < -40  # the phantom's fat reads as fat again
        aorta, liver = median_inside(volume, "aorta"), median_inside(volume, "liver")
        if phase_of(volume) == "arterial":
            assert aorta > 200 and aorta > liver + 100
        if phase_of(volume) == "non-contrast":
            assert aorta < contrast.UNENHANCED_AORTA_HU
    assert {phase_of(v) for v in renderings} & {"arterial", "portal-venous", "delayed"}


def test_a_rendering_can_be_asked_for_in_a_given_phase():
    """The benches score one rendering per phase, as they do the real CT's block."""
    phantom = make_phantom(5)
    aortas = {}
    for phase in contrast.PHASES:
        image, drawn = render(phantom.mr.astype(np.float32), phantom.label, (3.0, 3.0, 3.0), seed=7, phase=phase)
        assert drawn == phase
        aortas[phase] = float(np.median(image[phantom.label == ORGAN_IDS["aorta"]]))
    assert aortas["non-contrast"] < contrast.UNENHANCED_AORTA_HU < aortas["portal-venous"] < aortas["arterial"]


def test_pancreas_fat_reaches_the_rendered_gland_alone():
    phantom = make_phantom(5)
    mr = Volume(phantom.mr.astype(np.float32), phantom.label, "phantom_5_mr", (3.0, 3.0, 3.0))
    lean, fatty = pseudo_ct_volumes(mr, 1, seed=3)[0], pseudo_ct_volumes(mr, 1, seed=3, pancreas_fat=0.6)[0]
    assert median_inside(fatty, "pancreas") < median_inside(lean, "pancreas") - 10
    assert median_inside(fatty, "liver") == pytest.approx(median_inside(lean, "liver"), abs=1)


def test_a_ct_is_refused_as_the_mr_to_render():
    phantom = make_phantom(5)
    ct = Volume(phantom.ct.astype(np.float32), phantom.label, "phantom_5", (3.0, 3.0, 3.0))
    with pytest.raises(ValueError, match="reads as CT"):
        pseudo_ct_volumes(ct, 1)


def test_pseudo_ct_takes_its_share_from_the_phantoms():
    volume = Volume(np.zeros((4, 4, 2), np.float32), np.ones((4, 4, 2), np.uint8), "v", (3.0, 3.0, 3.0))
    with_all = train.TrainingData(synthetic=[volume], real=[volume], pseudo_ct=[volume], validation=[])
    assert [w for _, w in with_all.sample_groups(0.4, 0.2)] == pytest.approx([0.4, 0.4, 0.2])
    assert [w for _, w in train.TrainingData([volume], [volume], [], []).sample_groups(0.4, 0.2)] == \
        pytest.approx([0.6, 0.4])
    assert [w for _, w in train.TrainingData([], [volume], [], []).sample_groups(0.4, 0.2)] == [0.4]


def test_the_cli_trains_a_ct_model_on_renderings_of_an_mr_without_its_held_out_slices(tmp_path):
    """`python -m progidiff.train --pseudo-ct`: a CT phantom as the real volume and an MR phantom rendered as
    CT, at a tiny size; the MR's held-out slices split each rendering in two runs, none of them trained on."""
    model = save_awake_tiny_model(tmp_path / "model")
    ct, mr = ROOT / "sample-datasets" / "ct", ROOT / "sample-datasets" / "mr"
    record = train.main(["--out", str(tmp_path / "run"), "--init-from", str(model), "--image-size", "32",
                         "--organs", "liver,pancreas", "--volume", str(ct / "phantom_000.nii.gz"),
                         str(ct / "labels" / "final" / "phantom_000.nii.gz"), "schema",
                         "--pseudo-ct", str(mr / "phantom_000_mr.nii.gz"),
                         str(mr / "labels" / "final" / "phantom_000_mr.nii.gz"), "schema",
                         "--pseudo-ct-variants", "2", "--pseudo-ct-hold-out", "30:34", "--val-phantoms", "0",
                         "--max-steps", "3", "--batch-size", "2", "--val-every", "0"])
    assert record["steps"] == 3 and (tmp_path / "run" / "model").is_dir()
    assert record["volumes"] == {"synthetic": 0, "real": 1, "pseudo_ct": 4, "validation": 0}


def test_the_cli_refuses_pseudo_ct_for_an_mr_training_and_weights_above_one(tmp_path, capsys):
    for extra, message in ((["--modality", "mr"], "--pseudo-ct renders an MR as CT"),
                           (["--real-weight", "0.7", "--pseudo-ct-weight", "0.4"], "must be at most 1"),
                           (["--pancreas-fat", "0.95"], "pancreas fat share 0.95: give a share from 0")):
        with pytest.raises(SystemExit):
            train.main(["--out", str(tmp_path / "run"), "--pseudo-ct", "mr.nii.gz", "label.nii.gz", "schema",
                        *extra])
        assert message in capsys.readouterr().err


@requires_shared_data()
def test_the_real_mr_as_pseudo_ct_orders_its_tissues_as_ct():
    mr = load_volume_pair(SHARED_DATA / "mr_a" / "image.nii.gz", SHARED_DATA / "mr_a" / "label.nii.gz", "total_mr")
    for volume in pseudo_ct_volumes(mr, 4):
        body = volume.image[(volume.label == 0) & (volume.image > -500)]
        assert np.percentile(body, 25) < -50 < np.percentile(body, 90)  # fat and muscle both there
        assert median_inside(volume, "vertebrae") > median_inside(volume, "liver") > 40
        assert median_inside(volume, "pancreas") > 20
