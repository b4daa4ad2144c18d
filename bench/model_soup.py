"""Benchmark helper: average the weights of ProGiDiff models fine-tuned from the same model (a "model soup",
Wortsman et al. 2022), to measure whether averaging stage-2 runs beats any one of them (model/README.md,
"Averaging stage-2 runs").

    .venv/bin/python bench/model_soup.py runs/soup2 runs/recipe_two_stage/pseudo_ct/model runs/stage2_control_seed1/model
    .venv/bin/python bench/default_model.py --model runs/soup2 --no-baseline --steps 2 --out runs/soup2_bench.json

Averaging is only meaningful between runs that share their starting weights (here stage 1's model), so the
models must have the same configuration; a folder of another configuration is refused.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from progidiff.logs import configure_cli_logging
from progidiff.model import ProGiDiffModel


def average(models: list[ProGiDiffModel]) -> ProGiDiffModel:
    """The first model with every floating-point weight replaced by the mean over `models`."""
    states = [m.state_dict() for m in models]
    mean = {name: torch.stack([s[name].float() for s in states]).mean(0).to(value.dtype)
            if value.is_floating_point() else value for name, value in states[0].items()}
    models[0].load_state_dict(mean)
    return models[0]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="the averaged model folder to write")
    p.add_argument("models", type=Path, nargs="+", help="model folders fine-tuned from the same model")
    args = p.parse_args(argv)
    configure_cli_logging()
    try:
        models = [ProGiDiffModel.from_pretrained(d) for d in args.models]
    except FileNotFoundError as error:
        p.error(str(error))
    for directory, model in zip(args.models[1:], models[1:]):
        if model.config != models[0].config:
            p.error(f"{directory}: its configuration differs from {args.models[0]}'s; only runs of one model average")
    average(models).save_pretrained(args.out)
    print(f"{len(models)} models averaged -> {args.out}")


if __name__ == "__main__":
    main()
