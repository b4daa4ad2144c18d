"""Contrast phases: phantoms drawn in each phase, and real non-contrast slices moved to one."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from progidiff import contrast
from progidiff.data import SliceDataset, Volume
from progidiff.labels import ORGAN_IDS
from progidiff.phantoms import PancreasVariant, Patient, make_phantom

AORTA = ORGAN_IDS["aorta"]


@pytest.fixture(scope="module")
def unenhanced():
    return make_phantom(21, phase="non-contrast", slice_mm=5.0)


def phase_range(tissue: str, phase: str) -> tuple[float, float]:
    return contrast.TISSUE_HU[tissue][contrast.PHASES.index(phase)]


@pytest.mark.parametrize("phase", contrast.PHASES)
def test_a_phantom_in_each_phase_has_its_aorta_at_that_phase_s_hu(phase):
    p = make_phantom(30, phase=phase, slice_mm=5.0)
    assert p.meta["contrast"] == phase
    low, high = phase_range("aorta", phase)
    core = p.label == AORTA
    assert low - 25 < np.median(p.ct[core]) < high + 25  # noise, kernel and partial volume around the range
    assert contrast.is_unenhanced(p.ct.astype(np.float32), p.label, AORTA) == (phase == "non-contrast")


def test_the_delayed_phase_fills_the_renal_pelvis():
    p = make_phantom(31, phase="delayed", slice_mm=5.0)
    kidney = p.ct[p.label == ORGAN_IDS["kidney_left"]]
    assert np.percentile(kidney, 99) > 250  # excreted contrast in the collecting system


def test_patients_vary_as_the_issue_asks():
    """Over many seeds: every phase, arms at the sides and a table in a share of cases, slices 1.5-5 mm."""
    patients = [Patient(np.random.default_rng(seed), None, None) for seed in range(300)]
    assert {p.phase for p in patients} == set(contrast.PHASES)
    assert 0.2 < np.mean([p.arms for p in patients]) < 0.5
    assert 0.55 < np.mean([p.table for p in patients]) < 0.85
    assert min(p.slice_mm for p in patients) == 1.5 and max(p.slice_mm for p in patients) == 5.0
    fat = [p.fat for p in patients]
    assert min(fat) < 10 and max(fat) > 45  # lean to obese


def test_a_phantom_has_ribs_beside_its_spine(unenhanced):
    """Bone outside the vertebra label, out in the body wall: the ribs and costal cartilage."""
    p = unenhanced
    bone = (p.ct > 180) & (p.label == 0)
    x = np.argwhere(bone)[:, 0]
    centre = (p.ct.shape[0] - 1) / 2
    assert (np.abs(x - centre) > 25).sum() > 100  # at least 7.5 cm from the midline


def test_simulating_a_phase_moves_organs_and_keeps_the_rest(unenhanced):
    p = unenhanced
    image = p.ct.astype(np.float32)
    moved = contrast.simulate_phase(image, p.label, ORGAN_IDS, "portal-venous", np.random.default_rng(0))
    low, high = phase_range("aorta", "portal-venous")
    assert low - 5 < np.median(moved[p.label == AORTA]) < high + 5
    low, high = phase_range("liver", "portal-venous")
    liver = p.label == ORGAN_IDS["liver"]
    assert low - 5 < np.median(moved[liver]) < high + 5
    # the patient's own texture stays: the spread inside the liver is what it was
    assert np.std(moved[liver]) == pytest.approx(np.std(image[liver]), rel=0.15)
    far = ndimage.binary_erosion(p.label == 0, np.ones((3, 3, 3)), iterations=2)  # beyond the 2-voxel blur
    np.testing.assert_allclose(moved[far], image[far], atol=1e-3)
    assert contrast.simulate_phase(image, p.label, ORGAN_IDS, "non-contrast", np.random.default_rng(0)) is image


@pytest.fixture(scope="module")
def fatty():
    """A non-contrast phantom whose pancreas carries fat between its lobules (mean share 0.71)."""
    p = make_phantom(25, phase="non-contrast", slice_mm=5.0, pancreas=PancreasVariant(fat=0.8))
    assert p.meta["pancreas_fat"] > 0.6
    return p


def test_fat_in_a_gland_does_not_enhance(unenhanced, fatty):
    """A fatty gland rises by its parenchyma's share of what a lean gland rises: the real CT's pancreas (≈ 0 HU)
    must not turn uniformly bright in a simulated phase."""

    def rise(p) -> float:
        gland = p.label == ORGAN_IDS["pancreas"]
        moved = contrast.simulate_phase(p.ct.astype(np.float32), p.label, ORGAN_IDS, "arterial",
                                        np.random.default_rng(0))
        return float(np.median(moved[gland]) - np.median(p.ct[gland]))

    lean_rise, fatty_rise = rise(unenhanced), rise(fatty)
    assert lean_rise > 50
    assert 0.2 * lean_rise < fatty_rise < 0.6 * lean_rise


def test_the_arterial_phase_shows_the_renal_cortex(unenhanced):
    p = unenhanced
    moved = contrast.simulate_phase(p.ct.astype(np.float32), p.label, ORGAN_IDS, "arterial", np.random.default_rng(1))
    kidney = p.label == ORGAN_IDS["kidney_right"]
    depth = ndimage.distance_transform_edt(kidney, sampling=(3.0, 3.0, 5.0))
    cortex, medulla = moved[kidney & (depth <= 3)], moved[kidney & (depth > 8)]
    assert np.median(cortex) > np.median(medulla) + 50


def test_mr_is_never_taken_for_unenhanced_ct(unenhanced):
    assert not contrast.is_unenhanced(unenhanced.mr.astype(np.float32), unenhanced.label, AORTA)


def test_the_dataset_moves_unenhanced_slices_to_enhanced_phases(unenhanced):
    p = unenhanced
    volume = Volume(p.ct.astype(np.float32), p.label, "unenhanced", (3.0, 3.0, 5.0), unenhanced_ct=True)
    z = int(np.argmax((p.label == AORTA).sum(axis=(0, 1))))
    volume = Volume(volume.image[..., z : z + 1], volume.label[..., z : z + 1], "slice", volume.spacing, True)

    def aorta_hu(rate: float) -> list[float]:
        data = SliceDataset([([volume], 1.0)], 128, ["aorta"], augment=False, contrast_rate=rate, seed=3)
        return [float(item["image"][item["label"] == AORTA].median()) for item in (data[i] for i in range(12))]

    assert max(aorta_hu(0.0)) < 80
    assert min(aorta_hu(1.0)) > 90  # every enhanced phase has a bright aorta


def test_the_dataset_enhances_fat_only_when_asked(fatty):
    """The recipe's runs choose: `fat_aware_contrast` (train --fat-aware-contrast) or every voxel alike."""
    gland = fatty.label == ORGAN_IDS["pancreas"]
    z = int(np.argmax(gland.sum(axis=(0, 1))))
    volume = Volume(fatty.ct[..., z : z + 1].astype(np.float32), fatty.label[..., z : z + 1], "fatty", (3.0, 3.0, 5.0),
                    unenhanced_ct=True)

    def gland_hu(fat_aware: bool) -> float:
        data = SliceDataset([([volume], 1.0)], 128, ["pancreas"], negative_rate=0.0, augment=False,
                            contrast_rate=1.0, seed=3, fat_aware_contrast=fat_aware)
        items = [data[i] for i in range(6)]
        return float(np.mean([item["image"][item["label"] == ORGAN_IDS["pancreas"]].median() for item in items]))

    assert gland_hu(True) < gland_hu(False) - 30
