"""Shared fixtures: small models and the packaged text encoder, built once per test session."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from progidiff.model import CONTROL_WEIGHTS, ProGiDiffConfig, ProGiDiffModel  # noqa: E402
from progidiff.proposals import MASK_THRESHOLD  # noqa: E402
from progidiff.text import PromptEncoder, packaged_minilm_dir  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def minilm() -> PromptEncoder:
    return PromptEncoder(packaged_minilm_dir())


def tiny_config(**overrides) -> ProGiDiffConfig:
    """A compact model small enough for fast tests (image 32 px, mask 16 px)."""
    sizes = {"image_size": 32, "mask_size": 16, "compact_channels": (8, 16), "encoder_channels": (8, 8),
             "encoder_backbone": (8, 16)}
    return ProGiDiffConfig(**{**sizes, **overrides})


@pytest.fixture
def small_config() -> ProGiDiffConfig:
    return tiny_config()


@pytest.fixture
def small_model(small_config: ProGiDiffConfig) -> ProGiDiffModel:
    torch.manual_seed(0)
    return ProGiDiffModel.from_config(small_config)


ZERO_CONVOLUTIONS = (
    "controlnet_down_blocks",
    "controlnet_mid_block",
    "controlnet_cond_embedding.conv_out",
    "controlnet_cond_embedding.organ_head",
)


def wake_control_branch(model: ProGiDiffModel, scale: float = 0.05) -> None:
    """Give the zero convolutions random weights, as training would, so the branch has an effect."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.controlnet.named_parameters():
            if name.startswith(ZERO_CONVOLUTIONS):
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def weights_digest(model_dir: Path) -> str:
    """SHA-256 of a model folder's control-branch weights: tells which published version is there."""
    return hashlib.sha256((model_dir / "controlnet" / CONTROL_WEIGHTS).read_bytes()).hexdigest()


def save_awake_tiny_model(directory: Path, **overrides) -> Path:
    """A tiny model whose control branch has an effect, saved where a test server will serve it."""
    torch.manual_seed(0)
    model = ProGiDiffModel.from_config(tiny_config(**overrides))
    wake_control_branch(model, scale=0.3)
    model.save_pretrained(directory)
    return directory


def assert_same_proposals(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-4) -> None:
    """The same proposals as a user sees them: probabilities equal within `atol`, and every mask voxel the same
    wherever the probability is not within `atol` of the threshold.

    Computed floats are never compared bit for bit: torch picks other CPU kernels (AVX-512, AVX2, plain) for
    other machines, shapes and memory layouts, and their results differ in the last bits.
    """
    a, b = a.float(), b.float()
    torch.testing.assert_close(a, b, atol=atol, rtol=0)
    decided = (a - MASK_THRESHOLD).abs() > atol
    assert torch.equal((a >= MASK_THRESHOLD)[decided], (b >= MASK_THRESHOLD)[decided])


def requires_shared_data() -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} is absent (team data beside the checkout; not in a fresh clone)"
    )
