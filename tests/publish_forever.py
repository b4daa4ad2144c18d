"""Publishes a tiny model and an "mr" LoRA adapter over the same folders in an endless loop, version 1, 2, 3, …
(marked weights of version k hold k), so that a test can SIGKILL it in the middle of a publish.

    python tests/publish_forever.py FOLDER      # writes FOLDER/model and FOLDER/adapters/mr

The test runs `main` in processes forked from a multiprocessing forkserver that imported its dependencies once,
so that each of its kills costs no fresh import of torch, diffusers and peft (tens of seconds on 2 cores).
"""

import sys
from pathlib import Path
from typing import Callable

import torch

from conftest import tiny_config
from progidiff import lora
from progidiff.model import ProGiDiffModel

MARKED = ("unet.conv_in.bias", "controlnet.conv_in.bias")  # one tensor in each part the model saves separately


def announce_ready() -> None:
    print("ready", flush=True)


def main(folder: Path, ready: Callable[[], None] = announce_ready) -> None:
    """Publish forever; `ready()` once one complete version of each is on disk."""
    model = ProGiDiffModel.from_config(tiny_config())
    adapted = ProGiDiffModel.from_config(tiny_config())
    settings = lora.LoraSettings(rank=4)
    lora.add_adapter(adapted, "mr", settings)
    lora_weights = [p for name, p in adapted.named_parameters() if "lora_B" in name]
    parameters = dict(model.named_parameters())
    version = 0
    while True:
        version += 1
        with torch.no_grad():
            for name in MARKED:
                parameters[name].fill_(version)
            for weight in lora_weights:
                weight.fill_(version)
        model.save_pretrained(folder / "model")
        lora.save_adapter(adapted, "mr", folder / "adapters" / "mr", settings)
        if version == 1:
            ready()

if __name__ == "__main__":
    main(Path(sys.argv[1]))
