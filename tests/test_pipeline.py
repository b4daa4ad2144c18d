import pytest
import torch

from conftest import wake_control_branch
from progidiff.pipeline import ProGiDiffPipeline


@pytest.fixture
def pipeline(small_model, minilm):
    wake_control_branch(small_model)
    return ProGiDiffPipeline(small_model, minilm, scheduler="ddim", show_progress=False)


def _slices(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 1, 30, 26, generator=torch.Generator().manual_seed(3)) * 300


def test_output_shape_follows_input(pipeline):
    out = pipeline(_slices(3), ["liver", "spleen"], num_proposals=4, steps=3, seed=0)
    assert out.probabilities.shape == (4, 3, 2, 30, 26)
    assert out.probabilities.min() >= 0 and out.probabilities.max() <= 1
    assert out.organs == ["liver", "spleen"]


def test_same_seed_same_proposals_different_seed_different(pipeline):
    a = pipeline(_slices(), ["liver"], num_proposals=3, steps=3, seed=7).probabilities
    b = pipeline(_slices(), ["liver"], num_proposals=3, steps=3, seed=7).probabilities
    c = pipeline(_slices(), ["liver"], num_proposals=3, steps=3, seed=8).probabilities
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a[0], a[1])  # proposals of one request differ from each other


def test_proposals_do_not_depend_on_batching(pipeline):
    """Slice 2 sampled alone (with its index) equals slice 2 sampled with its neighbours and other organs."""
    images = _slices(3)
    together = pipeline(images, ["liver", "spleen"], num_proposals=2, steps=3, seed=1).probabilities
    alone = pipeline(images[2:], ["liver"], num_proposals=2, steps=3, seed=1, slice_indices=[2]).probabilities
    assert torch.allclose(together[:, 2, 0], alone[:, 0, 0], atol=1e-5)


@pytest.mark.parametrize("scheduler", ["ddim", "dpm", "ddpm"])
def test_every_sampler_runs(small_model, minilm, scheduler):
    pipe = ProGiDiffPipeline(small_model, minilm, scheduler=scheduler, show_progress=False)
    out = pipe(_slices(1), ["aorta"], num_proposals=2, steps=4, seed=0)
    assert torch.isfinite(out.probabilities).all()


def test_bad_inputs_are_rejected_early(pipeline, small_model, minilm):
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        pipeline(torch.zeros(30, 26), ["liver"])
    with pytest.raises(ValueError, match="num_proposals"):
        pipeline(_slices(), ["liver"], num_proposals=0)
    with pytest.raises(ValueError, match="steps"):
        pipeline(_slices(), ["liver"], steps=0)
    with pytest.raises(ValueError, match="NaN"):
        pipeline(torch.full((1, 1, 8, 8), float("nan")), ["liver"])
    with pytest.raises(ValueError, match="Unknown scheduler"):
        ProGiDiffPipeline(small_model, minilm, scheduler="euler")
