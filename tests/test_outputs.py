"""Outputs come back to the input's geometry a few channels at a time, with the same result as all at once."""

import nibabel as nib
import numpy as np
import pytest
import torch

from progidiff.labels import ORGAN_IDS
from progidiff.outputs import inverter, maps_in_input_geometry
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
    stack = inverter(loaded.image, loaded.transform, "image")(torch.cat([each.mean(0), each.std(0, unbiased=False), each.flatten(0, 1)])).as_tensor()
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
    np.testing.assert_allclose(chunked.probability, mean.max(dim=0).values.numpy(), atol=1e-5)
    np.testing.assert_allclose(chunked.uncertainty, std.max(dim=0).values.numpy(), atol=1e-5)
    assert len(np.unique(chunked.consensus)) > 3  # several organs win somewhere: the comparison is not empty

