"""Promote a training candidate to the served model, on purpose.

A train run publishes only an epoch that beats the served model on the same validation slices; otherwise its
best epoch stays as a candidate beside the run (`<run>/candidate`, named in the train stats). An admin who
wants it anyway (another validation set, a judgement call) promotes it explicitly:

    .venv/bin/python -m progidiff.promote runs/app/progidiff/train_01/<run id>/candidate model/progidiff_ct
    .venv/bin/python -m progidiff.promote runs/app/progidiff_mr_lora/train_01/<run id>/candidate model/adapters/mr

A model folder, or an adapter folder (adapter_config.json + safetensors), is replaced atomically; the server
picks it up on its next request.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from .io_utils import atomic_directory
from .lora import ADAPTER_CONFIG
from .model import ProGiDiffModel


def promote(candidate: Path, target: Path) -> None:
    if (Path(candidate) / ADAPTER_CONFIG).is_file():  # an adapter: its files, as they are
        with atomic_directory(target) as tmp:
            for file in Path(candidate).iterdir():
                shutil.copy2(file, tmp / file.name)
        return
    ProGiDiffModel.from_pretrained(candidate).save_pretrained(target)


def main() -> None:
    parser = argparse.ArgumentParser(description="Replace the served model folder with a training candidate")
    parser.add_argument("candidate", type=Path, help="a candidate model or adapter folder written by a train run")
    parser.add_argument("model_dir", type=Path, help="the served folder: --conf model_path, or adapters_path/<modality>")
    args = parser.parse_args()
    promote(args.candidate, args.model_dir)
    print(f"promoted {args.candidate} → {args.model_dir}")


if __name__ == "__main__":
    main()
