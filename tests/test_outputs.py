"""Outputs come back to the input's geometry a few channels at a time, with the same result as all at once, and
by separable interpolation with the same values as MONAI's inverse."""

import nibabel as nib
import numpy as np
import pytest
import torch

from progidiff.labels import ORGAN_IDS
from progidiff.outputs import NEGLIGIBLE, SeparableInverse, maps_in_input_geometry, monai_inverter
from progidiff.predict import load_volume
from progidiff.proposals import MASK_THRESHOLD
from progidiff.volume import VolumeProposals

ORGANS = ["liver", "spleen", "aorta", "kidney_left", "stomach"]


@pytest.fixture
def loaded(tmp_path):
    """A LPS-oriented, 1.2 × 1.2 × 2.5 mm scan: the model frame (RAS, 3 mm in-plane) differs from it."""
    affine = np.diag([-1.2, -1.2, 2.5, 1.0])
    image = (np.random.default_rng(0).normal(0, 100, (50, 40, 6))).astype(np.int16)
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "scan.nii.gz")
    return load_volume(tmp_path / "scan.nii.gz", 3.0)


def test_chunked_maps_equal_one_pass_over_every_channel(loaded):
    x, y, z = loaded.image.shape[1:]
    generator = torch.Generator().manual_seed(0)
    probabilities = torch.rand(3, len(ORGANS), x, y, z, generator=generator).to(torch.float16)
    proposals = VolumeProposals(ORGANS, probabilities, 0, 10, 0.0)
    # 2 channels per pass: 3 passes for the 5 organs' consensus
    chunked = maps_in_input_geometry(proposals, loaded.image, loaded.transform, pass_bytes=2 * 2 * 4 * 50 * 40 * 6)
    assert chunked.consensus.shape == (50, 40, 6) and chunked.consensus.dtype == np.uint8
    assert np.allclose(chunked.affine, np.diag([-1.2, -1.2, 2.5, 1.0]))

    # the reference: every channel brought back in one pass, then the argmax
    values = torch.tensor([ORGAN_IDS[o] for o in ORGANS], dtype=torch.uint8)
    each = probabilities.float()
    stack = monai_inverter(loaded.image, loaded.transform, "image")(torch.cat([each.mean(0), each.std(0, unbiased=False), each.flatten(0, 1)])).as_tensor()
    mean, std, per_proposal = stack[:5], stack[5:10], stack[10:].reshape(3, 5, 50, 40, 6)

    def assert_same_label_map(got: np.ndarray, p: torch.Tensor, atol: float = 1e-5) -> None:
        """Equal wherever the winner is clear: not a near-tie between organs, not at the threshold (the
        passes interpolate other channel counts, so their floats may differ in the last bits)."""
        top = p.topk(2, dim=0).values
        best, index = p.max(dim=0)
        expected = torch.where(best >= MASK_THRESHOLD, values[index], torch.zeros((), dtype=torch.uint8)).numpy()
        decided = (((top[0] - top[1]) > atol) & ((top[0] - MASK_THRESHOLD).abs() > atol)).numpy()
        assert decided.mean() > 0.9  # the comparison covers nearly every voxel
        assert np.array_equal(got[decided], expected[decided])

    assert_same_label_map(chunked.consensus, mean)
    for k in range(3):
        assert_same_label_map(chunked.proposals[k], per_proposal[k])
    np.testing.assert_allclose(chunked.probability, mean.max(dim=0).values.numpy(), atol=1e-3)  # float16
    np.testing.assert_allclose(chunked.uncertainty, std.max(dim=0).values.numpy(), atol=NEGLIGIBLE)  # below: 0
    assert len(np.unique(chunked.consensus)) > 3  # several organs win somewhere: the comparison is not empty



def oblique(degrees: float) -> np.ndarray:
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    angle = np.deg2rad(degrees)
    affine[:2, :2] = 1.5 * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return affine


def scan(tmp_path, affine: np.ndarray, shape=(50, 40, 6)):
    image = (np.random.default_rng(0).normal(0, 100, shape)).astype(np.int16)
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "scan.nii.gz")
    return load_volume(tmp_path / "scan.nii.gz", 3.0)


@pytest.mark.parametrize("affine", [
    np.diag([-1.2, -1.2, 2.5, 1.0]),  # LPS, finer in-plane
    np.diag([0.7, 0.9, 1.0, 1.0]) + np.array([[0, 0, 0, 12.5], [0, 0, 0, -3.0], [0, 0, 0, 40.0], [0, 0, 0, 0]]),
    np.array([[0, 0, -2.0, 0], [1.1, 0, 0, 0], [0, -4.0, 0, 0], [0, 0, 0, 1.0]]),  # axes stored in another order
    oblique(20),  # the model's frame keeps the scan's directions (MONAI's Spacing): still one axis per axis
])
def test_the_separable_way_back_equals_monais_inverse(tmp_path, affine):
    loaded = scan(tmp_path, affine)
    separable = SeparableInverse.between(loaded.image)
    assert separable is not None
    channels = torch.rand(3, *loaded.image.shape[1:], generator=torch.Generator().manual_seed(1))
    expected = monai_inverter(loaded.image, loaded.transform, "image")(channels)
    got = separable(channels)
    assert got.shape == expected.shape == (3, 50, 40, 6)
    torch.testing.assert_close(got.as_tensor(), expected.as_tensor().float(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(got.affine), np.asarray(expected.affine), atol=1e-6)



def test_organs_brought_back_where_they_are_found_equal_every_voxel_brought_back(tmp_path):
    """Each organ is interpolated only near where it is found (one at the frame's border, one nowhere): the
    label maps equal MONAI's inverse of every channel over the whole grid."""
    loaded = scan(tmp_path, np.diag([-1.2, -1.2, 2.5, 1.0]))
    x, y, z = loaded.image.shape[1:]
    probabilities = torch.zeros(2, 3, x, y, z)
    probabilities[:, 0, 3:9, 4:10, 1:4] = 0.9  # inside
    probabilities[1, 0, 3:9, 4:10, 1:4] = 0.3  # the proposals disagree there
    probabilities[:, 1, :5, -4:, :] = 0.8  # at the border
    proposals = VolumeProposals(["liver", "spleen", "aorta"], probabilities.to(torch.float16), 0, 1, 0.0)
    maps = maps_in_input_geometry(proposals, loaded.image, loaded.transform)
    everything = monai_inverter(loaded.image, loaded.transform, "image")(
        torch.cat([probabilities.mean(0), probabilities.std(0, unbiased=False), probabilities.flatten(0, 1)])).as_tensor()
    mean, std, each = everything[:3], everything[3:6], everything[6:].reshape(2, 3, 50, 40, 6)
    values = torch.tensor([ORGAN_IDS[o] for o in proposals.organs], dtype=torch.uint8)

    def assert_same_label_map(got: np.ndarray, channels: torch.Tensor) -> None:
        """Equal wherever the largest value is not within float error of the threshold."""
        best, index = channels.max(dim=0)
        expected = torch.where(best >= MASK_THRESHOLD, values[index], torch.zeros((), dtype=torch.uint8)).numpy()
        decided = ((best - MASK_THRESHOLD).abs() > 1e-4).numpy()
        assert np.array_equal(got[decided], expected[decided])

    assert {1, 2} <= set(np.unique(maps.consensus))
    assert_same_label_map(maps.consensus, mean)
    for k in range(2):
        assert_same_label_map(maps.proposals[k], each[k])
    np.testing.assert_allclose(maps.probability, mean.max(0).values.numpy(), atol=NEGLIGIBLE)
    np.testing.assert_allclose(maps.uncertainty, std.max(0).values.numpy(), atol=NEGLIGIBLE)
