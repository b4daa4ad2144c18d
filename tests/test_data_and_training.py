"""Phantoms, the label schema, the training loop, and the evaluate/segment CLIs on tiny cases."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from conftest import SHARED_DATA, requires_shared_data, save_awake_tiny_model, tiny_config, wake_control_branch
from progidiff import evaluate, segment, train
from progidiff.baseline import BaselineSegmenter
from progidiff.data import SliceDataset, Volume, load_volume_pair, phantom_volumes, split_slices
from progidiff.labels import ORGAN_IDS, load_class_map, organs_present, to_schema
from progidiff.model import ProGiDiffModel
from progidiff.phantoms import (AORTA_X, PANCREAS_COURSE, PANCREAS_NECK, PHANTOM_ORGANS, SLICE_MM, PancreasPose,
                                PancreasVariant, make_phantom, pancreas_block, write_sample_set)
from progidiff.training import DiffusionTrainer, TrainConfig, boundary_shift, jitter_boundaries

TINY_ORGANS = ["liver", "spleen", "kidney_left", "aorta"]
SAMPLE = Path(__file__).resolve().parents[1] / "sample-datasets" / "ct"


# ---- phantoms -------------------------------------------------------------------------------------
def test_phantom_is_deterministic_and_varies_with_seed():
    a, b, c = make_phantom(3), make_phantom(3), make_phantom(4)
    assert np.array_equal(a.ct, b.ct) and np.array_equal(a.label, b.label)
    assert not np.array_equal(a.label, c.label)


def test_phantom_anatomy_and_intensities():
    p = make_phantom(0)
    assert p.ct.shape == p.mr.shape == p.label.shape
    assert set(organs_present(p.label, min_voxels=20)) >= set(PHANTOM_ORGANS)
    liver = p.ct[p.label == ORGAN_IDS["liver"]].mean()
    assert 30 < liver < 140  # soft-tissue HU, non-contrast or portal-venous
    assert p.ct[p.label == ORGAN_IDS["vertebrae"]].mean() > 150  # bone
    assert np.percentile(p.ct, 1) < -900  # air around the body
    kidney_x = np.argwhere(p.label == ORGAN_IDS["kidney_right"])[:, 0].mean()
    assert kidney_x > np.argwhere(p.label == ORGAN_IDS["kidney_left"])[:, 0].mean()  # RAS: right is +x
    assert p.mr.min() >= 0 and not np.array_equal(np.argsort(p.mr.ravel()[:500]), np.argsort(p.ct.ravel()[:500]))


def test_pancreas_fat_lowers_the_glands_hu_and_changes_nothing_else():
    lean = make_phantom(6, phase="non-contrast")
    fatty = make_phantom(6, phase="non-contrast", pancreas=PancreasVariant(fat=0.6))
    pancreas = lean.label == ORGAN_IDS["pancreas"]
    assert np.array_equal(lean.label, fatty.label) and lean.meta["pancreas_fat"] == 0
    assert 0 < fatty.meta["pancreas_fat"] <= 0.6
    # Parenchyma 30-45 HU mixed with fat near -100: the gland's median falls by about 140 HU per unit of share.
    drop = np.median(lean.ct[pancreas]) - np.median(fatty.ct[pancreas])
    assert drop == pytest.approx(140 * fatty.meta["pancreas_fat"], abs=25)
    far = ~ndimage.binary_dilation(pancreas, iterations=3)  # beyond partial volume and the scanner's blur
    np.testing.assert_allclose(lean.ct[far], fatty.ct[far], atol=3)  # the blur's tails, rounded to HU


def test_pancreas_pose_moves_the_glands_course():
    course = PANCREAS_COURSE
    np.testing.assert_allclose(PancreasPose().posed(course), course)  # the default is the template's pose
    head, neck, tail = course[0], course[PANCREAS_NECK], course[-1]
    posed = PancreasPose(x_scale=0.5, head_z_scale=0.5, body_z_scale=2.0, shift=(0.0, 3.0, 0.0)).posed(course)
    np.testing.assert_allclose(posed[:, 0] - AORTA_X, (course[:, 0] - AORTA_X) * 0.5)  # halfway to the aorta
    np.testing.assert_allclose(posed[:, 1], course[:, 1] + 3.0)
    np.testing.assert_allclose(posed[PANCREAS_NECK, 2] - posed[0, 2], (neck[2] - head[2]) * 0.5)  # a shorter head
    np.testing.assert_allclose(posed[-1, 2] - posed[PANCREAS_NECK, 2], (tail[2] - neck[2]) * 2.0)  # a steeper body


def test_a_posed_pancreas_is_the_same_patient_with_the_gland_elsewhere():
    # Seed 3 draws a gland 0.6 times the template's distance from the aorta (shapes painted after it differ:
    # they draw from the seed's stream after the gland's lobules).
    template = make_phantom(3, phase="non-contrast")
    posed = make_phantom(3, phase="non-contrast", pancreas=PancreasVariant(pose=True))
    assert template.meta["pancreas_pose"] == {"x_scale": 1.0, "head_z_scale": 1.0, "body_z_scale": 1.0,
                                              "shift": [0.0, 0.0, 0.0]}
    assert posed.meta["pancreas_pose"]["x_scale"] == pytest.approx(0.6, abs=0.01)
    assert {k: v for k, v in posed.meta.items() if k != "pancreas_pose"} == \
        {k: v for k, v in template.meta.items() if k != "pancreas_pose"}  # phase, size, scanner: the seed's

    def head_right_of_aorta(p):  # voxels, the gland's lowest quarter
        gland, aorta = np.argwhere(p.label == ORGAN_IDS["pancreas"]), np.argwhere(p.label == ORGAN_IDS["aorta"])
        return gland[gland[:, 2] <= np.percentile(gland[:, 2], 25), 0].mean() - aorta[:, 0].mean()

    assert 0 < head_right_of_aorta(posed) < 0.8 * head_right_of_aorta(template)


def test_a_pancreas_bed_lays_the_same_gland_in_fat():
    packed = make_phantom(3, phase="non-contrast")
    bedded = make_phantom(3, phase="non-contrast", pancreas=PancreasVariant(bed=True))
    assert packed.meta["pancreas_bed_mm"] == 0 and 4 <= bedded.meta["pancreas_bed_mm"] <= 12
    gland = packed.label == ORGAN_IDS["pancreas"]
    np.testing.assert_array_equal(bedded.label == ORGAN_IDS["pancreas"], gland)  # the same gland, the same patient
    spacing = np.abs(np.diag(packed.affine)[:3])
    around = (ndimage.distance_transform_edt(~gland, sampling=spacing) <= 4) & ~gland

    def fat_share(p):  # of the voxels within 4 mm of the gland, those that read as fat
        return float(np.mean(p.ct[around] < -40))

    assert fat_share(bedded) > 0.45 and fat_share(bedded) > fat_share(packed) + 0.15
    solid = [ORGAN_IDS[o] for o in ("liver", "gallbladder", "spleen", "kidney_right", "kidney_left")]
    assert np.isin(bedded.label[around], solid).mean() < 0.5 * np.isin(packed.label[around], solid).mean()
    for hollow in ("duodenum", "stomach"):  # their walls are kept
        assert (bedded.label == ORGAN_IDS[hollow]).sum() == (packed.label == ORGAN_IDS[hollow]).sum()


def test_sample_set_files_share_geometry(tmp_path):
    write_sample_set(tmp_path, count=1, seed=7, mr_count=1)
    image = nib.load(tmp_path / "ct" / "phantom_007.nii.gz")
    label = nib.load(tmp_path / "ct" / "labels" / "final" / "phantom_007.nii.gz")
    mr = nib.load(tmp_path / "mr" / "phantom_007_mr.nii.gz")
    assert image.shape == label.shape == mr.shape
    assert np.allclose(image.affine, label.affine) and np.allclose(image.affine, mr.affine)
    assert np.allclose(np.abs(np.diag(image.affine))[:2], 3.0)  # the model's in-plane spacing
    assert abs(image.affine[2, 2]) in SLICE_MM  # slices as a scanner reconstructs them


def test_pancreas_block_is_centred_on_the_pancreas_and_stays_inside_the_volume():
    label = np.zeros((4, 4, 40), dtype=np.int64)
    assert pancreas_block(label) == slice(14, 26)  # no pancreas: the middle slices
    label[:, :, 30:33] = ORGAN_IDS["pancreas"]
    assert pancreas_block(label) == slice(25, 37)
    label[:] = 0
    label[:, :, 1] = ORGAN_IDS["pancreas"]
    assert pancreas_block(label) == slice(0, 7)  # clipped at the first slice


# ---- label schema ---------------------------------------------------------------------------------
def test_label_maps_are_mapped_by_name_not_id(tmp_path):
    class_map = {"total": {"52": "aorta", "5": "liver", "31": "vertebrae_L1", "90": "brain"},
                 "total_mr": {"23": "aorta", "5": "liver", "19": "vertebrae"}}
    (tmp_path / "class_map.json").write_text(json.dumps(class_map))
    ct = to_schema(np.array([0, 52, 5, 31, 90]), load_class_map("total", tmp_path / "label.nii.gz"))
    mr = to_schema(np.array([0, 23, 5, 19]), load_class_map("total_mr", tmp_path / "label.nii.gz"))
    aorta, liver, vertebrae = ORGAN_IDS["aorta"], ORGAN_IDS["liver"], ORGAN_IDS["vertebrae"]
    assert ct.tolist() == [0, aorta, liver, vertebrae, 0]
    assert mr.tolist() == [0, aorta, liver, vertebrae]
    with pytest.raises(KeyError, match="total_xx"):
        load_class_map("total_xx", tmp_path / "label.nii.gz")


@requires_shared_data()
def test_real_ct_and_mr_labels_load_into_the_schema():
    ct = load_volume_pair(SHARED_DATA / "ct_a" / "image.nii.gz", SHARED_DATA / "ct_a" / "label.nii.gz", "total")
    mr = load_volume_pair(SHARED_DATA / "mr_a" / "image.nii.gz", SHARED_DATA / "mr_a" / "label.nii.gz", "total_mr")
    for volume in (ct, mr):
        assert {"liver", "spleen", "aorta", "kidney_left"} <= set(organs_present(volume.label, 50))
    # same organ, same schema value, although the source ids differ (52 vs 23)
    assert (ct.label == ORGAN_IDS["aorta"]).sum() > 100 and (mr.label == ORGAN_IDS["aorta"]).sum() > 100
    assert ct.image.min() < -500 and mr.image.min() >= -100  # RAS, HU vs MR magnitudes


# ---- training -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_volumes():
    return phantom_volumes(2, seed=500)


def test_a_held_out_block_leaves_contiguous_training_runs():
    """The slices either side of a held-out block train as two volumes: no slice's neighbour lies across it."""
    z = np.arange(10, dtype=np.float32)
    volume = Volume(np.broadcast_to(z, (2, 3, 10)).copy(), np.zeros((2, 3, 10), np.uint8), "ct", (3.0, 3.0, 3.0), True)
    runs, held_out = split_slices(volume, range(4, 6))
    assert [run.image[0, 0].tolist() for run in runs] == [[0, 1, 2, 3], [6, 7, 8, 9]]
    assert [run.image[0, 0].tolist() for run in held_out] == [[4, 5]] and all(run.unenhanced_ct for run in runs)
    runs, held_out = split_slices(volume, [2, 3, 7])
    assert [run.image[0, 0].tolist() for run in held_out] == [[2, 3], [7]]
    assert [run.image[0, 0].tolist() for run in runs] == [[0, 1], [4, 5, 6], [8, 9]]
    runs, _ = split_slices(volume, range(7, 10))
    assert len(runs) == 1 and runs[0].image.shape[2] == 7


def _trainer(small_config, minilm, volumes, out, **overrides) -> DiffusionTrainer:
    torch.manual_seed(0)
    model = ProGiDiffModel.from_config(small_config)
    dataset = SliceDataset([(volumes, 1.0)], small_config.image_size, TINY_ORGANS, seed=0,
                           context_slices=small_config.context_slices)
    config = TrainConfig(**{"batch_size": 4, "learning_rate": 2e-3, "val_every": 0, "checkpoint_every": 0,
                            "val_proposals": 2, "val_steps": 2, "val_organs": "liver", **overrides})
    return DiffusionTrainer(model, minilm, dataset, volumes[:1], config, out)


@pytest.mark.parametrize("boundary_jitter, full_size_readout, context_slices",
                         [(0.0, False, 0), (1.5, False, 0), (0.0, True, 0), (0.0, False, 1)])
def test_a_few_steps_reduce_the_loss(minilm, tiny_volumes, tmp_path, boundary_jitter, full_size_readout,
                                     context_slices):
    config = tiny_config(boundary_jitter=boundary_jitter, full_size_readout=full_size_readout,
                         context_slices=context_slices)
    trainer = _trainer(config, minilm, tiny_volumes, tmp_path, max_steps=40)
    assert trainer.model.config.boundary_jitter == boundary_jitter
    batch = next(iter(torch.utils.data.DataLoader(trainer.train_set, batch_size=8)))

    def fixed_loss() -> float:
        trainer.generator.manual_seed(123)
        with torch.no_grad():
            return trainer.loss(batch)["loss"].item()

    before = fixed_loss()
    trainer.fit()
    assert trainer.step == 40
    assert fixed_loss() < 0.8 * before
    assert (tmp_path / "tensorboard").is_dir() and trainer.history[-1]["step"] == 40


def test_resume_continues_from_the_checkpoint(small_config, minilm, tiny_volumes, tmp_path):
    first = _trainer(small_config, minilm, tiny_volumes, tmp_path, max_steps=4, checkpoint_every=2)
    first.fit()
    saved = {k: v.clone() for k, v in first.model.state_dict().items()}
    second = _trainer(small_config, minilm, tiny_volumes, tmp_path, max_steps=6)
    assert second.resume() and second.step == 4
    assert all(torch.equal(saved[k], v) for k, v in second.model.state_dict().items())
    second.fit()
    assert second.step == 6 and [h["step"] for h in second.history] == [4, 6]


def test_a_resumed_run_keeps_its_clock(small_config, minilm, tiny_volumes, tmp_path):
    """`max_minutes` counts every launch's training time: a run whose budget is spent does not start over."""
    first = _trainer(small_config, minilm, tiny_volumes, tmp_path, max_steps=3)
    first.fit()
    assert first.trained_seconds > 0
    spent = first.trained_seconds / 60
    second = _trainer(small_config, minilm, tiny_volumes, tmp_path, max_steps=10, max_minutes=spent)
    assert second.resume() and second.trained_seconds == pytest.approx(first.trained_seconds)
    second.fit()
    assert second.step == 3  # its budget was spent before this launch


def _trained_outside_the_scan_encoder(trainer: DiffusionTrainer) -> list[torch.Tensor]:
    encoder = {id(p) for p in trainer.model.scan_encoder.parameters()}
    return [p.detach().clone() for p in trainer.params if id(p) not in encoder]


@pytest.mark.parametrize("encoder_minutes", [0.0, 1e-6])
def test_the_encoder_only_phase_ends_at_its_steps_or_its_minutes(small_config, minilm, tiny_volumes, tmp_path,
                                                                 encoder_minutes):
    """The warm-up trains the scan encoder alone; `encoder_minutes` ends it early (on a slower machine), so that
    the time budget still leaves the whole model its share."""
    trainer = _trainer(small_config, minilm, tiny_volumes, tmp_path, max_steps=3, encoder_steps=100,
                       encoder_minutes=encoder_minutes)
    before = _trained_outside_the_scan_encoder(trainer)
    trainer.fit()
    after = _trained_outside_the_scan_encoder(trainer)
    rest_trained = any(not torch.equal(a, b) for a, b in zip(before, after))
    if encoder_minutes:  # 60 µs: spent before the first step
        assert trainer.whole_model_from == 0 and not trainer.in_encoder_phase and rest_trained
    else:
        assert trainer.whole_model_from is None and trainer.in_encoder_phase and not rest_trained


def _train_on_one_phantom(out: Path, *extra: str) -> dict:
    return train.main(["--out", str(out), "--image-size", "32", "--volume", str(SAMPLE / "phantom_000.nii.gz"),
                       str(SAMPLE / "labels" / "final" / "phantom_000.nii.gz"), "schema", "--val-phantoms", "0",
                       "--val-every", "0", "--batch-size", "2", "--threads", str(torch.get_num_threads()), *extra])


def test_a_run_whose_time_ends_in_the_encoder_phase_writes_no_model(tmp_path):
    """Its diffusion UNet never trained: the CLI says so and keeps the checkpoint instead of writing a model that
    `promote` could serve."""
    out = tmp_path / "run"
    model = save_awake_tiny_model(tmp_path / "model")
    with pytest.raises(SystemExit, match="inside its encoder-only phase"):
        _train_on_one_phantom(out, "--init-from", str(model), "--organs", "liver", "--max-steps", "5",
                              "--encoder-steps", "5", "--max-minutes", "1e-9")
    assert (out / "checkpoint.pt").is_file() and not (out / "model").exists()


def test_the_baseline_goes_on_from_its_own_model(tmp_path, capsys):
    """A two-stage recipe's same-budget baseline: stage 2 starts from stage 1's baseline weights, not from fresh
    ones; a model folder of the other kind is refused with what to give instead."""
    first = _train_on_one_phantom(tmp_path / "stage1", "--baseline", "--max-steps", "3")
    assert first["steps"] == 3
    stage1 = tmp_path / "stage1" / "model"
    _train_on_one_phantom(tmp_path / "again", "--baseline", "--init-from", str(stage1), "--max-steps", "0")
    _train_on_one_phantom(tmp_path / "stage2", "--baseline", "--init-from", str(stage1), "--max-steps", "2")
    weights = {name: BaselineSegmenter.from_pretrained(tmp_path / name / "model").state_dict()
               for name in ("stage1", "again", "stage2")}
    assert all(torch.allclose(weights["again"][k], v) for k, v in weights["stage1"].items())
    assert not all(torch.allclose(weights["stage2"][k], v) for k, v in weights["stage1"].items())

    with pytest.raises(SystemExit):
        _train_on_one_phantom(tmp_path / "wrong", "--init-from", str(stage1), "--max-steps", "1")
    assert "give --baseline to go on training it" in capsys.readouterr().err
    diffusion_model = save_awake_tiny_model(tmp_path / "diffusion")
    with pytest.raises(SystemExit):
        _train_on_one_phantom(tmp_path / "wrong", "--baseline", "--init-from", str(diffusion_model), "--max-steps", "1")
    assert "--baseline goes on from a baseline model folder" in capsys.readouterr().err


def test_boundary_jitter_moves_the_whole_boundary_out_or_in():
    masks = torch.zeros(4, 1, 64, 64)
    masks[:3, :, 20:44, 20:44] = 1  # a 24-pixel square
    masks[3, :, 30, 30:33] = 1  # a thin organ
    out = jitter_boundaries(masks, 2.0, torch.tensor([1.0, -1.0, 0.0, -1.0]))
    area = out.sum(dim=(1, 2, 3))
    assert 26**2 <= area[0] <= 29**2 and bool((out[0] >= masks[0]).all())  # grown by about 2 px a side
    assert 19**2 <= area[1] <= 22**2 and bool((out[1] <= masks[1]).all())  # shrunk by about 2 px a side
    assert abs(area[2] - 24**2) <= 24  # no shift: the same square, corners rounded
    assert torch.equal(out[3], masks[3])  # shrinking would have emptied it: kept
    assert jitter_boundaries(masks, 0.0, torch.ones(4)) is masks


def test_boundary_shift_is_uniform_and_follows_the_noise_on_the_organ():
    masks = torch.zeros(4000, 1, 32, 32)
    masks[:, :, 8:24, 8:24] = 1  # the organ covers the noise map's pixels 4..11
    noise = torch.randn(4000, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    shift = boundary_shift(noise, masks)
    assert shift.min() >= -1 and shift.max() <= 1
    counts = torch.histc(shift, bins=4, min=-1, max=1)
    assert (counts > 800).all() and (counts < 1200).all()
    on_organ = torch.zeros_like(noise)
    on_organ[:, :, 4:12, 4:12] = 0.5
    assert (boundary_shift(noise + on_organ, masks) > shift).all()  # brighter noise on the organ: larger mask
    assert torch.allclose(boundary_shift(noise + 0.5 - on_organ, masks), shift, atol=1e-5)  # elsewhere: no effect
    assert (boundary_shift(noise, torch.zeros_like(masks)) == 0).all()  # negative prompt: nothing to move


# ---- CLIs ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "model"
    torch.manual_seed(0)
    model = ProGiDiffModel.from_config(tiny_config())
    wake_control_branch(model, 0.3)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_case(tmp_path_factory):
    folder = tmp_path_factory.mktemp("case")
    write_sample_set(folder, count=1, seed=11, mr_count=0)
    return folder / "ct" / "phantom_011.nii.gz", folder / "ct" / "labels" / "final" / "phantom_011.nii.gz"


def test_evaluate_writes_the_documented_keys(tiny_model_dir, tiny_case, tmp_path):
    image, label = tiny_case
    result = evaluate.main(["--model", str(tiny_model_dir), "--image", str(image), "--label", str(label),
                            "--organs", "liver,spleen", "--proposals", "2", "--steps", "2", "--slices", "10:20",
                            "--out", str(tmp_path / "result.json")])
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved == json.loads(json.dumps(result))
    for organ in ("liver", "spleen"):
        assert set(saved["organs"][organ]) >= {"dice_consensus", "dice_best", "dice_mean", "hd95_consensus", "ged",
                                               "bracketing_inside_generous", "bracketing_tightest_inside"}
        assert 0 <= saved["organs"][organ]["dice_mean"] <= saved["organs"][organ]["dice_best"] <= 1
    assert saved["seconds"] > 0 and saved["slices"] == list(range(10, 20))
    assert (tmp_path / "result_liver.png").stat().st_size > 1000


def test_a_scored_block_is_segmented_with_the_slices_a_25d_model_reads_beside_it():
    assert evaluate.context_span([10, 11, 12], depth=20, context_slices=1) == range(9, 14)
    assert evaluate.context_span([0, 1, 18, 19], depth=20, context_slices=2) == range(0, 20)  # clipped at the ends
    assert evaluate.context_span([5, 6], depth=20, context_slices=0) == range(5, 7)  # 1-slice models: the block


def test_segment_writes_outputs_in_the_input_geometry(tiny_model_dir, tiny_case, tmp_path):
    image, _ = tiny_case
    summary = segment.main(["--model", str(tiny_model_dir), "--image", str(image), "--prompt", "L kidney, liver",
                            "--proposals", "2", "--steps", "2", "--out", str(tmp_path)])
    source = nib.load(image)
    for name in ("consensus", "proposal_0", "proposal_1", "uncertainty"):
        written = nib.load(tmp_path / f"{name}.nii.gz")
        assert written.shape == source.shape and np.allclose(written.affine, source.affine, atol=1e-4)
    assert summary["label_names"] == {"kidney_left": 3, "liver": 1}
    assert json.loads((tmp_path / "summary.json").read_text())["seconds"] > 0
    assert (tmp_path / "montage_liver.png").is_file()
