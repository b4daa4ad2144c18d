import pytest
import torch

from conftest import wake_control_branch
from progidiff.model import ProGiDiffModel
from progidiff.pipeline import ProGiDiffPipeline


def test_round_trip_gives_identical_proposals(small_model, minilm, tmp_path):
    wake_control_branch(small_model)
    small_model.config.organs = ["liver", "spleen"]
    small_model.save_pretrained(tmp_path / "model")
    loaded = ProGiDiffModel.from_pretrained(tmp_path / "model")
    assert loaded.config == small_model.config
    images = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 300
    before = ProGiDiffPipeline(small_model, minilm, show_progress=False)(images, ["liver"], 2, 3, seed=4)
    after = ProGiDiffPipeline.from_pretrained(tmp_path / "model", show_progress=False)(images, ["liver"], 2, 3, seed=4)
    assert torch.equal(before.probabilities, after.probabilities)
    assert (tmp_path / "model" / "controlnet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_failed_save_keeps_the_previous_model(small_model, tmp_path, monkeypatch):
    small_model.save_pretrained(tmp_path / "model")
    reference = ProGiDiffModel.from_pretrained(tmp_path / "model").state_dict()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    wake_control_branch(small_model)
    monkeypatch.setattr(small_model.unet, "save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        small_model.save_pretrained(tmp_path / "model")
    survivor = ProGiDiffModel.from_pretrained(tmp_path / "model").state_dict()
    assert all(torch.equal(reference[k], survivor[k]) for k in reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folders left behind


def test_loading_a_non_model_folder_says_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="progidiff_config.json"):
        ProGiDiffModel.from_pretrained(tmp_path)


def test_a_publish_killed_between_renames_is_recovered(small_model, tmp_path):
    small_model.save_pretrained(tmp_path / "model")
    (tmp_path / "model").rename(tmp_path / ".model.old")  # the state right after the first rename
    assert ProGiDiffModel.from_pretrained(tmp_path / "model").config == small_model.config
