"""Pseudo-MR: a labelled CT rendered in MR contrast keeps its anatomy and takes the real MR's tissue order."""

from __future__ import annotations

import numpy as np

from conftest import SHARED_DATA, requires_shared_data
from progidiff.data import Volume, load_volume_pair
from progidiff.labels import ORGAN_IDS
from progidiff.phantoms import make_phantom
from progidiff.pseudo_mr import pseudo_mr_volumes, render, tissue_map


def median_inside(image: np.ndarray, label: np.ndarray, organ: str) -> float:
    return float(np.median(image[label == ORGAN_IDS[organ]]))


def test_unlabelled_voxels_take_their_tissue_from_the_hounsfield_band_and_organs_from_their_label():
    ct = np.array([-1000, -700, -100, 40, 200, 900, 40, 40, -800, 40], dtype=np.float32).reshape(10, 1, 1)
    label = np.zeros((10, 1, 1), dtype=np.uint8)
    label[6], label[7], label[8], label[9] = ORGAN_IDS["liver"], ORGAN_IDS["kidney_left"], ORGAN_IDS["colon"], \
        ORGAN_IDS["colon"]
    tissues, names = tissue_map(ct, label)
    assert [names[t] for t in tissues.ravel()] == ["air", "lung", "fat", "muscle", "bone_marrow", "bone_cortex",
                                                   "liver", "kidney_cortex", "gas", "bowel_wall"]


def test_a_phantom_ct_rendered_as_t1_orders_its_organs_as_the_real_mr():
    phantom = make_phantom(3)
    for seed in range(6):
        image, sequence = render(phantom.ct.astype(np.float32), phantom.label, seed)
        if sequence == "T1":
            break
    assert image.shape == phantom.ct.shape and image.min() >= 0
    liver, spleen, kidney = (median_inside(image, phantom.label, o) for o in ("liver", "spleen", "kidney_left"))
    fat = float(np.median(image[(phantom.ct > -120) & (phantom.ct < -80) & (phantom.label == 0)]))
    assert fat > 2 * liver and liver > 2 * spleen and liver > 2 * kidney  # T1: fat bright, spleen and kidneys dark


def test_variants_differ_keep_the_labels_and_are_reproducible():
    phantom = make_phantom(4)
    volume = Volume(phantom.ct.astype(np.float32), phantom.label, "phantom_4", (3.0, 3.0, 3.0), unenhanced_ct=True)
    first, second = pseudo_mr_volumes(volume, 2, seed=10)
    again = pseudo_mr_volumes(volume, 1, seed=10)[0]
    np.testing.assert_allclose(first.image, again.image, rtol=1e-6)
    assert not np.allclose(first.image, second.image)
    assert all(np.array_equal(v.label, volume.label) and not v.unenhanced_ct for v in (first, second))
    assert "pseudo-MR" in first.name


@requires_shared_data()
def test_the_real_ct_as_pseudo_mr_has_the_real_mrs_contrast_between_liver_spleen_and_kidneys():
    """The ratios, not the scale, matter: every MR study is rescaled by its percentiles before the model."""
    ct = load_volume_pair(SHARED_DATA / "ct_a" / "image.nii.gz", SHARED_DATA / "ct_a" / "label.nii.gz", "total")
    mr = load_volume_pair(SHARED_DATA / "mr_a" / "image.nii.gz", SHARED_DATA / "mr_a" / "label.nii.gz", "total_mr")
    t1 = next(v for v in pseudo_mr_volumes(ct, 6) if "T1" in v.name)

    def ratios(volume: Volume) -> np.ndarray:
        liver = median_inside(volume.image, volume.label, "liver")
        return np.array([median_inside(volume.image, volume.label, o) / liver for o in ("spleen", "kidney_left")])

    np.testing.assert_allclose(ratios(t1), ratios(mr), atol=0.2)
