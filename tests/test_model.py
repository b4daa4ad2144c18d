import pytest
import torch

from conftest import tiny_config, wake_control_branch
from progidiff.image_encoder import IntensityWindows
from progidiff.model import ProGiDiffModel


def _inputs(model: ProGiDiffModel, batch: int = 2):
    size = model.working_size
    generator = torch.Generator().manual_seed(0)
    noisy = torch.randn(batch, model.mask_channels, size, size, generator=generator)
    image = torch.randn(batch, 1, model.config.image_size, model.config.image_size, generator=generator) * 400
    timesteps = torch.tensor([10, 900])[:batch]
    text = torch.randn(batch, 16, model.unet.config.cross_attention_dim, generator=generator)
    organ_index = torch.tensor([0, 3])[:batch]
    return noisy, timesteps, text, image, organ_index


@pytest.mark.parametrize("image_size, mask_size", [(32, 16), (64, 64)])
def test_forward_shapes(image_size, mask_size):
    model = ProGiDiffModel.from_config(tiny_config(image_size=image_size, mask_size=mask_size))
    noisy, timesteps, text, image, organ = _inputs(model)
    with torch.no_grad():
        out = model(noisy, timesteps, text, image, organ)
    assert model.working_size == mask_size
    assert out.shape == (2, 1, mask_size, mask_size)


def test_untrained_branch_leaves_base_output_unchanged(small_model):
    noisy, timesteps, text, image, organ = _inputs(small_model)
    assert small_model.uses_organ_prior
    with torch.no_grad():
        base = small_model.unet(noisy, timesteps, encoder_hidden_states=text).sample
        steered = small_model(noisy, timesteps, text, image, organ)
        torch.testing.assert_close(steered, base)  # zero connections add nothing
        wake_control_branch(small_model)
        assert not torch.allclose(base, small_model(noisy, timesteps, text, image, organ))


def test_branch_output_depends_on_the_scan(small_model):
    wake_control_branch(small_model)
    noisy, timesteps, text, image, organ = _inputs(small_model)
    with torch.no_grad():
        a = small_model(noisy, timesteps, text, image, organ)
        b = small_model(noisy, timesteps, text, image + 300, organ)
        c = small_model(noisy, timesteps, text, image, organ.flip(0))
    assert not torch.allclose(a, b)
    assert not torch.allclose(a, c)  # the organ prior follows the prompted organ


def test_precomputed_scan_features_give_the_same_prediction(small_model):
    """What the sampler relies on when it encodes each slice once for every step, proposal and organ."""
    wake_control_branch(small_model)
    noisy, timesteps, text, image, organ = _inputs(small_model)
    with torch.no_grad():
        features = small_model.scan_encoder.features(image)
        assert torch.allclose(small_model(noisy, timesteps, text, image, organ),
                              small_model(noisy, timesteps, text, None, organ, features=features))


def test_organ_prior_needs_the_organ(small_model):
    noisy, timesteps, text, image, _ = _inputs(small_model)
    with pytest.raises(ValueError, match="organ_index"):
        small_model(noisy, timesteps, text, image)


def test_compact_base_trains_with_branch_by_default(small_model):
    assert all(p.requires_grad for p in small_model.unet.parameters())
    assert all(p.requires_grad for p in small_model.controlnet.parameters())


def test_intensity_windows_map_hu_to_unit_range():
    windows = IntensityWindows(((40.0, 400.0),))
    hu = torch.tensor([-1000.0, 40.0, 240.0, 3000.0]).view(1, 1, 2, 2)
    out = windows(hu)
    assert out.shape == (1, 2, 2, 2)
    assert torch.allclose(out[0, 0].flatten(), torch.tensor([-1.0, 0.0, 1.0, 1.0]))
    assert out.abs().max() <= 1.0


def test_encode_decode_mask_round_trip(small_model):
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    probability = small_model.decode_mask(small_model.encode_mask(mask))
    assert probability.shape == (1, 1, 32, 32)
    assert ((probability >= 0.5) == mask.bool()).float().mean() > 0.95


def test_full_size_readout_reads_organs_at_the_image_size():
    """With the option the read-out is at the scan's size (32 px here), not the mask's (16 px); the branch
    still reads the working-size features, so precomputed features give the same prediction."""
    model = ProGiDiffModel.from_config(tiny_config(full_size_readout=True))
    wake_control_branch(model)
    noisy, timesteps, text, image, organ = _inputs(model)
    encoder = model.scan_encoder
    with torch.no_grad():
        features = encoder.features(image)
        assert encoder.organ_logits(features).shape[-2:] == (32, 32)
        prediction = model(noisy, timesteps, text, image, organ)
        assert prediction.shape[-2:] == (16, 16)
        torch.testing.assert_close(prediction, model(noisy, timesteps, text, None, organ, features=features))
    default = ProGiDiffModel.from_config(tiny_config())
    with torch.no_grad():
        assert default.scan_encoder.organ_logits(default.scan_encoder.features(image)).shape[-2:] == (16, 16)


def test_decoded_mask_keeps_the_full_size_boundary_of_the_readout(small_model):
    """A denoised mask that is exactly the averaged prior (no diffusion residual) decodes to the full-size
    read-out's own probabilities, detail finer than the mask included; without the prior it would be blurred."""
    prior = torch.full((1, 1, 32, 32), -6.0)
    prior[..., 9:22, 5:18] = 6.0  # edges off the 16-px mask's 2-px grid
    averaged = torch.nn.functional.interpolate(prior, size=16, mode="area")
    latents = torch.tanh(averaged / 2)
    with torch.no_grad():
        kept = small_model.decode_mask(latents, full_size_prior=prior)
        blurred = small_model.decode_mask(latents)
    torch.testing.assert_close(kept, prior.sigmoid(), atol=1e-5, rtol=0)
    assert ((blurred >= 0.5) != (prior >= 0)).any()
