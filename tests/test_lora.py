"""LoRA adapters: small, saved alone, change the outputs when active, and leave the bare model exact when not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import save_awake_tiny_model, tiny_config, wake_control_branch, weights_digest
from progidiff import lora, train
from progidiff.intensity import normalisation_for
from progidiff.geometry import to_square
from progidiff.model import CONTROL_WEIGHTS, ProGiDiffModel
from progidiff.phantoms import make_phantom

ROOT = Path(__file__).resolve().parents[1]


def mr_batch(model: ProGiDiffModel) -> tuple:
    """Two MR-phantom slices, noisy masks at two timesteps, and prompt tokens: one model input."""
    phantom = make_phantom(0)
    slices = torch.from_numpy(phantom.mr[:, :, [15, 25]].astype("float32")).permute(2, 0, 1)[:, None]
    image = to_square(slices, model.config.image_size)
    size = model.config.compact_mask_size
    generator = torch.Generator().manual_seed(0)
    noisy = torch.randn(2, 1, size, size, generator=generator)
    text = torch.randn(2, model.config.text_max_length, model.config.cross_attention_dim, generator=generator)
    return noisy, torch.tensor([20, 600]), text, image, torch.tensor([0, 0])


def test_adapter_is_small_saved_alone_and_switchable(tmp_path):
    torch.manual_seed(0)
    model = ProGiDiffModel.from_config(tiny_config(organs=["liver"]))
    wake_control_branch(model, scale=0.3)
    model.save_pretrained(tmp_path / "model")
    model.eval()
    inputs = mr_batch(model)
    with torch.no_grad():
        bare = model(*inputs)

    trainable = lora.add_adapter(model, "mr", lora.LoraSettings(rank=4))
    total = sum(p.numel() for p in model.parameters())
    assert 0 < trainable < 0.05 * total
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(*inputs), bare)  # a fresh adapter starts as a no-op (B = 0)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(1))
        adapted = model(*inputs)
    assert not torch.allclose(adapted, bare)

    lora.save_adapter(model, "mr", tmp_path / "adapters" / "mr", lora.LoraSettings(rank=4))
    adapter_bytes = sum(f.stat().st_size for f in (tmp_path / "adapters" / "mr").iterdir())
    model_bytes = (tmp_path / "model" / "controlnet" / CONTROL_WEIGHTS).stat().st_size
    assert adapter_bytes < 0.1 * model_bytes

    lora.activate(model, None)
    with torch.no_grad():
        torch.testing.assert_close(model(*inputs), bare)  # disabled: the CT model

    fresh = ProGiDiffModel.from_pretrained(tmp_path / "model").eval()
    lora.load_adapter(fresh, tmp_path / "adapters" / "mr", "mr")
    assert lora.adapter_names(fresh) == ["mr"] and lora.active_adapter(fresh) is None
    with torch.no_grad():
        torch.testing.assert_close(fresh(*inputs), bare)
        lora.activate(fresh, "mr")
        assert torch.allclose(fresh(*inputs), adapted, atol=1e-5)
        lora.activate(fresh, None)
        torch.testing.assert_close(fresh(*inputs), bare)


def test_the_cli_trains_an_adapter_alone_and_records_the_mr_normalisation(tmp_path):
    """`python -m progidiff.train --lora mr --modality mr`: the adapter's recipe (model/README.md) at a tiny size,
    a labelled CT rendered as pseudo-MR beside the real MR."""
    model_dir = save_awake_tiny_model(tmp_path / "model")
    before = weights_digest(model_dir)
    mr, ct = ROOT / "sample-datasets" / "mr", ROOT / "sample-datasets" / "ct"
    ct_label = ct / "labels" / "final" / "phantom_001.nii.gz"
    record = train.main(["--out", str(tmp_path / "run"), "--init-from", str(model_dir), "--lora", "mr",
                         "--lora-rank", "4", "--modality", "mr", "--image-size", "32",
                         "--volume", str(mr / "phantom_000_mr.nii.gz"), str(mr / "labels" / "final" / "phantom_000_mr.nii.gz"),
                         "schema", "--hold-out", "30:32,40:42", "--val-phantoms", "0", "--balanced-anatomy",
                         "--pseudo-mr", str(ct / "phantom_001.nii.gz"), str(ct_label),
                         "schema", "--pseudo-mr-variants", "2", "--real-weight", "0.5",
                         "--max-steps", "3", "--batch-size", "2", "--val-every", "0", "--val-proposals", "1",
                         "--val-steps", "1", "--val-organs", "liver"])
    adapter = tmp_path / "run" / "adapter"
    assert sorted(p.name for p in adapter.iterdir()) == [lora.ADAPTER_CONFIG, lora.ADAPTER_WEIGHTS]
    config = json.loads((adapter / lora.ADAPTER_CONFIG).read_text())
    assert config["modality"] == "MR" and config["intensity"] == normalisation_for("MR").to_dict()
    assert config["settings"]["rank"] == 4 and record["config"]["balanced_anatomy"] is True
    assert record["steps"] == 3 and "liver" in record["final_validation"]["dice"]
    assert record["volumes"] == {"synthetic": 2, "real": 1, "pseudo_ct": 0, "validation": 2}  # two held-out blocks
    assert weights_digest(model_dir) == before  # the model itself is never written
    fresh = ProGiDiffModel.from_pretrained(model_dir)
    lora.load_adapter(fresh, adapter, "mr")
    assert lora.adapter_names(fresh) == ["mr"]


def test_the_cli_refuses_pseudo_mr_for_a_ct_training(tmp_path, capsys):
    ct = ROOT / "sample-datasets" / "ct"
    with pytest.raises(SystemExit):
        train.main(["--out", str(tmp_path / "run"), "--pseudo-mr", str(ct / "phantom_001.nii.gz"),
                    str(ct / "labels" / "final" / "phantom_001.nii.gz"), "schema"])
    assert "--pseudo-mr renders a CT as MR" in capsys.readouterr().err


def test_an_adapter_of_another_model_is_refused_and_leaves_the_model_as_it_was(tmp_path):
    """A 2.5D model's scan encoder reads 3 slices: the LoRA of a 1-slice model does not fit its first layer."""
    torch.manual_seed(0)
    one_slice = ProGiDiffModel.from_config(tiny_config(organs=["liver"]))
    lora.add_adapter(one_slice, "mr", lora.LoraSettings(rank=4))
    lora.save_adapter(one_slice, "mr", tmp_path / "mr", lora.LoraSettings(rank=4))
    two_and_a_half_d = ProGiDiffModel.from_config(tiny_config(organs=["liver"], context_slices=1))
    with pytest.raises(ValueError, match="does not fit this model.*retrain"):
        lora.load_adapter(two_and_a_half_d, tmp_path / "mr", "mr")
    assert lora.adapter_names(two_and_a_half_d) == [] and lora.active_adapter(two_and_a_half_d) is None
    lora.add_adapter(two_and_a_half_d, "mr", lora.LoraSettings(rank=4))  # the name is free for its own adapter
    assert lora.adapter_names(two_and_a_half_d) == ["mr"]
