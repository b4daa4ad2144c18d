import os
import subprocess
import sys

import torch
import torch.nn.functional as F

from progidiff.text import PromptEncoder, packaged_minilm_dir


def test_packaged_encoder_loads_offline():
    """A fresh process with the hub cut off (HF_HUB_OFFLINE=1) must still load the packaged encoder."""
    code = (
        "from progidiff.text import PromptEncoder, packaged_minilm_dir;"
        "e = PromptEncoder(packaged_minilm_dir()); print(tuple(e.encode(['liver']).shape))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": "/nonexistent-hf-home"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(1, 16, 384)" in result.stdout


def _pooled(encoder: PromptEncoder, text: str) -> torch.Tensor:
    return encoder.encode([text])[0].mean(dim=0)


def test_token_embeddings_separate_organs(minilm):
    liver, spleen, hepatic = (_pooled(minilm, t) for t in ("liver", "spleen", "liver organ"))
    assert not torch.allclose(minilm.encode(["liver"]), minilm.encode(["spleen"]))
    # a paraphrase of liver lies closer to liver than spleen does
    assert F.cosine_similarity(liver, hepatic, dim=0) > F.cosine_similarity(liver, spleen, dim=0)


def test_embeddings_are_per_token_and_cached(minilm):
    out = minilm.encode(["liver", "left kidney"])
    assert out.shape == (2, minilm.max_length, minilm.hidden_size)
    assert not torch.allclose(out[0, 1], out[0, 2])  # token embeddings, not one pooled vector repeated
    assert "left kidney" in minilm._cache
    torch.testing.assert_close(minilm.encode(["left kidney"])[0], out[1])


def test_packaged_folder_exists():
    assert (packaged_minilm_dir() / "config.json").is_file()
