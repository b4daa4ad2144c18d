"""A Stable-Diffusion-layout base folder loads through the same code path real weights use."""

import pytest
import torch

from conftest import assert_same_proposals, tiny_config, wake_control_branch
from progidiff.model import ProGiDiffModel
from progidiff.pipeline import ProGiDiffPipeline
from tiny_sd import build_tiny_sd


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


def test_sd_base_gives_latent_space_proposals(sd_folder, tmp_path):
    torch.manual_seed(0)
    model = ProGiDiffModel.from_config(tiny_config(base=str(sd_folder), image_size=32))
    assert model.vae is not None and model.config.text_encoder == "base"
    assert model.working_size == 16 and model.mask_channels == 4  # the tiny VAE downsamples by 2
    assert not any(p.requires_grad for p in model.unet.parameters())  # the pretrained base stays frozen
    assert all(p.requires_grad for p in model.controlnet.parameters())

    wake_control_branch(model)
    pipeline = ProGiDiffPipeline.from_model(model, show_progress=False)
    assert pipeline.prompt_encoder.hidden_size == 32  # the base's own CLIP, not MiniLM
    images = torch.randn(2, 1, 30, 34, generator=torch.Generator().manual_seed(0)) * 300
    out = pipeline(images, ["liver", "spleen"], num_proposals=2, steps=3, seed=0)
    assert out.probabilities.shape == (2, 2, 2, 30, 34)

    model.save_pretrained(tmp_path / "model")
    assert not (tmp_path / "model" / "unet").exists()  # the base is referenced, never copied
    again = ProGiDiffPipeline.from_pretrained(tmp_path / "model", show_progress=False)
    assert_same_proposals(again(images, ["liver", "spleen"], 2, 3, seed=0).probabilities, out.probabilities)


def test_incomplete_base_folder_is_named(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(FileNotFoundError, match="vae/, scheduler/"):
        ProGiDiffModel.from_config(tiny_config(base=str(tmp_path)))
