import pytest
import torch

from conftest import assert_same_proposals, tiny_config, wake_control_branch
from progidiff.model import ProGiDiffModel, prior_offsets
from progidiff.pipeline import ProGiDiffPipeline
from progidiff.volume import axial_slices, scan_features, segment_volume, slices_to_sample


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
    assert_same_proposals(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a[0], a[1])  # proposals of one request differ from each other


@pytest.mark.parametrize("scheduler, full_size_readout", [("ddim", False), ("ddpm", False), ("ddim", True)])
def test_proposals_do_not_depend_on_batching(minilm, scheduler, full_size_readout):
    """Slice 2 sampled alone equals slice 2 sampled with its neighbours and other organs; with the
    stochastic DDPM sampler too, whose per-step noise belongs to the proposal, not to the batch; and with a
    full-size read-out, whose prior each proposal, slice and organ takes back at decoding."""
    torch.manual_seed(0)
    model = ProGiDiffModel.from_config(tiny_config(full_size_readout=full_size_readout))
    wake_control_branch(model)
    pipeline = ProGiDiffPipeline(model, minilm, scheduler=scheduler, show_progress=False)
    images = _slices(3)
    together = pipeline(images, ["liver", "spleen"], num_proposals=2, steps=3, seed=1).probabilities
    alone = pipeline(images[2:], ["liver"], num_proposals=2, steps=3, seed=1).probabilities
    assert torch.allclose(together[:, 2, 0], alone[:, 0, 0], atol=1e-5)


@pytest.mark.parametrize("noise", ["shared", "independent"])
def test_a_proposal_starts_from_the_same_noise_on_every_slice(small_model, minilm, noise):
    """Proposal k is one 3D answer: its starting noise is shared by all slices, not drawn per slice; with shared
    noise every proposal of an organ starts from it, else each proposal has its own."""
    pipeline = ProGiDiffPipeline(small_model, minilm, show_progress=False, proposal_noise=noise)
    latents = pipeline.prepare_latents(3, 4, ["liver", "spleen"], seed=5).view(3, 4, 2, -1)
    assert torch.equal(latents[:, 0], latents[:, 3])  # same noise on slices 0 and 3
    assert torch.equal(latents[0], latents[1]) == (noise == "shared")  # another proposal
    assert not torch.equal(latents[:, :, 0], latents[:, :, 1])  # another organ, other noise


def test_shared_noise_runs_the_network_once_for_all_proposals_with_the_same_result(pipeline):
    """The first step's inputs repeat proposal 0's: one pass on B·P items plus each proposal's prior offset is
    what the network gives on all N·B·P items."""
    assert pipeline.shares_noise
    n, slices, organs = 3, _slices(2), ["liver", "spleen"]
    model = pipeline.model
    features = pipeline.encode_slices(slices).repeat_interleave(2, dim=0).repeat(n, 1, 1, 1)
    latents = pipeline.prepare_latents(n, 2, organs, seed=0)
    text = pipeline.encode_prompt(organs).repeat(n * 2, 1, 1)
    organ_index = torch.tensor([0, 1]).repeat(n * 2)  # liver, spleen: schema values 1 and 2
    offsets = pipeline.prepare_prior_offsets(n, 2, 2)
    t = torch.full((latents.shape[0],), 999)
    with torch.inference_mode():
        everyone = model(latents, t, text, None, organ_index, features=features, prior_offset=offsets)
        once = pipeline.predict_once_for_all_proposals(latents, t, text, features, organ_index, offsets, n)
    torch.testing.assert_close(once, everyone, atol=1e-5, rtol=0)

    batches = []
    hook = model.unet.register_forward_hook(lambda module, args, output: batches.append(args[0].shape[0]))
    areas = pipeline(slices, organs, num_proposals=n, steps=1, seed=0).probabilities.sum(dim=(1, 3, 4))
    hook.remove()
    assert batches == [2 * 2]  # one pass over slices × organs, not × proposals
    assert (areas[0] < areas[1]).all() and (areas[1] < areas[2]).all()  # still tight to generous


def test_a_stochastic_sampler_adds_the_same_noise_on_every_slice(small_model, minilm):
    """Three copies of one slice: with DDPM each proposal is the same on all three, and differs from
    the other proposal (one coherent 3D answer per proposal, as with the starting noise)."""
    pipeline = ProGiDiffPipeline(small_model, minilm, scheduler="ddpm", show_progress=False)
    out = pipeline(_slices(1).repeat(3, 1, 1, 1), ["liver"], num_proposals=2, steps=4, seed=2).probabilities
    assert torch.allclose(out[:, 0], out[:, 2], atol=1e-6)
    assert not torch.allclose(out[0], out[1], atol=1e-3)


def test_prior_offsets_run_evenly_from_tight_to_generous():
    assert torch.allclose(prior_offsets(5, 2.0), torch.tensor([-1.6, -0.8, 0.0, 0.8, 1.6]))
    torch.testing.assert_close(prior_offsets(1, 2.0), torch.zeros(1))  # one proposal: the model's plain answer
    torch.testing.assert_close(prior_offsets(4, 0.0), torch.zeros(4))


def test_spread_moves_each_proposal_along_the_organ_prior(pipeline, small_model, minilm):
    """With the spread, proposal k follows the prior at its own confidence level: the first is the
    tightest, the last the most generous; without it, the proposals share the prior."""
    assert pipeline.spread == small_model.config.proposal_spread == 4.0
    with torch.no_grad():
        small_model.scan_encoder.organ_head.bias.zero_()  # a prior centred on 0.5, so offsets move it visibly
    spread = ProGiDiffPipeline(small_model, minilm, show_progress=False, spread=6.0)
    flat = ProGiDiffPipeline(small_model, minilm, show_progress=False, spread=0.0)
    areas = spread(_slices(2), ["liver"], num_proposals=3, steps=3, seed=0).probabilities.sum(dim=(1, 2, 3, 4))
    assert areas[0] < areas[1] < areas[2]
    flat_areas = flat(_slices(2), ["liver"], num_proposals=3, steps=3, seed=0).probabilities.sum(dim=(1, 2, 3, 4))
    assert (areas[2] - areas[0]) > 3 * (flat_areas.max() - flat_areas.min())


def test_bad_spread_is_rejected(small_model, minilm):
    with pytest.raises(ValueError, match="spread must be a number from 0 to 20"):
        ProGiDiffPipeline(small_model, minilm, spread=-1.0)
    without_prior = ProGiDiffModel.from_config(tiny_config(organ_prior=False))
    with pytest.raises(ValueError, match="organ prior"):
        ProGiDiffPipeline(without_prior, minilm, spread=2.0)
    assert ProGiDiffPipeline(without_prior, minilm).spread == 0.0  # its own default: nothing to spread


@pytest.mark.parametrize("scheduler", ["ddim", "dpm", "ddpm"])
def test_every_sampler_runs(small_model, minilm, scheduler):
    pipe = ProGiDiffPipeline(small_model, minilm, scheduler=scheduler, show_progress=False)
    out = pipe(_slices(1), ["aorta"], num_proposals=2, steps=4, seed=0)
    assert torch.isfinite(out.probabilities).all()


def test_axial_slices_stack_each_slice_between_its_neighbours():
    volume = torch.arange(4.0).view(1, 1, 4).expand(2, 3, 4)  # slice z holds the value z
    assert axial_slices(volume).shape == (4, 1, 2, 3)
    stacked = axial_slices(volume, context_slices=1)
    assert stacked.shape == (4, 3, 2, 3)
    assert stacked[:, :, 0, 0].tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3]]  # the ends repeat


def test_a_2_5d_model_reads_the_neighbouring_slices(minilm, tmp_path):
    """With `context_slices` 1 a slice's proposals follow its neighbours (and nothing further), the setting
    survives save and load, and lone slices are refused with what the model reads."""
    torch.manual_seed(0)
    model = ProGiDiffModel.from_config(tiny_config(context_slices=1))
    wake_control_branch(model)
    model.save_pretrained(tmp_path / "model")
    pipeline = ProGiDiffPipeline(ProGiDiffModel.from_pretrained(tmp_path / "model"), minilm, show_progress=False)
    assert pipeline.model.config.context_slices == 1
    volume = torch.randn(30, 26, 5, generator=torch.Generator().manual_seed(2)) * 300
    changed = volume.clone()
    changed[..., 4] += 500.0
    before = segment_volume(pipeline, volume, ["liver"], num_proposals=2, steps=2).probabilities.float()
    after = segment_volume(pipeline, changed, ["liver"], num_proposals=2, steps=2).probabilities.float()
    assert torch.allclose(before[..., :3], after[..., :3], atol=1e-3)  # slices 0-2 do not see slice 4
    assert (before[..., 3] - after[..., 3]).abs().max() > 1e-2  # slice 3 does
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\] of slices, each with its 1 neighbours each side"):
        pipeline(_slices(), ["liver"])


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


def test_screening_samples_only_slices_that_can_hold_the_organ(pipeline, monkeypatch):
    volume = torch.randn(30, 26, 8, generator=torch.Generator().manual_seed(4)) * 300
    everything = segment_volume(pipeline, volume, ["liver"], num_proposals=2, steps=2, seed=1)
    # The scan encoder sees the liver on slices 3 and 4 only: 2..5 are sampled (one neighbour each way).
    presence = torch.tensor([0.0, 0.0, 0.01, 0.9, 0.6, 0.0, 0.0, 0.0])[:, None]
    monkeypatch.setattr(pipeline, "organ_presence", lambda features, organs: presence[: features.shape[0]])
    screened = segment_volume(pipeline, volume, ["liver"], num_proposals=2, steps=2, seed=1, screen_threshold=0.05)
    sampled = [2, 3, 4, 5]
    # Same noise, same slices: the same proposals (float16 storage: within its rounding).
    assert_same_proposals(screened.probabilities[..., sampled], everything.probabilities[..., sampled], atol=2e-3)
    skipped = [0, 1, 6, 7]
    assert screened.probabilities[..., skipped].abs().sum() == 0


def test_each_organ_is_sampled_only_where_it_can_be(pipeline, monkeypatch):
    volume = torch.randn(30, 26, 8, generator=torch.Generator().manual_seed(4)) * 300
    everything = segment_volume(pipeline, volume, ["liver", "spleen"], num_proposals=2, steps=2, seed=1)
    # Liver seen on slice 1, spleen on slice 6: each is sampled on its own slices ± 1 only.
    presence = torch.zeros(8, 2)
    presence[1, 0], presence[6, 1] = 0.7, 0.4
    monkeypatch.setattr(pipeline, "organ_presence", lambda features, organs: presence[: features.shape[0]])
    calls = []
    sample = pipeline.__call__
    monkeypatch.setattr(type(pipeline), "__call__", lambda self, *a, **k: calls.append(a[1]) or sample(*a, **k))
    screened = segment_volume(pipeline, volume, ["liver", "spleen"], num_proposals=2, steps=2, seed=1,
                              screen_threshold=0.05)
    assert calls == [["liver"], ["spleen"]]
    for channel, sampled in ((0, [0, 1, 2]), (1, [5, 6, 7])):
        skipped = [z for z in range(8) if z not in sampled]
        # Same noise, other batch composition: equal up to float16 rounding.
        assert torch.allclose(screened.probabilities[:, channel, ..., sampled].float(),
                              everything.probabilities[:, channel, ..., sampled].float(), atol=2e-3)
        assert screened.probabilities[:, channel, ..., skipped].abs().sum() == 0


def test_screening_with_the_real_organ_read_out(pipeline):
    volume = torch.randn(30, 26, 4, generator=torch.Generator().manual_seed(5)) * 300
    head = pipeline.model.scan_encoder.organ_head
    with torch.no_grad():
        head.bias.fill_(-30.0)  # sure that no organ is anywhere: nothing to sample
    assert slices_to_sample(pipeline, scan_features(pipeline, volume), ["liver"], threshold=0.05) == {"liver": []}
    with torch.no_grad():
        head.bias.fill_(30.0)  # sure that every organ is everywhere: every slice
    assert slices_to_sample(pipeline, scan_features(pipeline, volume), ["liver"], threshold=0.05) == {"liver": [0, 1, 2, 3]}
