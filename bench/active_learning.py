"""Benchmark: does picking by proposal disagreement beat random picking?

On synthetic CT phantoms, from a weak model (trained briefly on one labelled phantom), run
`--rounds` rounds of "pick one image from the unlabelled pool → add its label → fine-tune the control
branch (base frozen, as POST /train/progidiff does)" with each strategy, and score the consensus Dice
on held-out phantoms after every round.  Same weak start, same fine-tuning budget, same seeds for
both strategies.  Writes JSON and a PNG plot.

    .venv/bin/python bench/active_learning.py --out bench/results/active_learning.json
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import random
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from progidiff.data import Volume, phantom_volumes  # noqa: E402
from progidiff.logs import configure_cli_logging  # noqa: E402
from progidiff.model import ProGiDiffConfig, ProGiDiffModel  # noqa: E402
from progidiff.pipeline import ProGiDiffPipeline  # noqa: E402
from progidiff.proposals import disagreement  # noqa: E402
from progidiff.training import TrainConfig, train_on_volumes  # noqa: E402
from progidiff.volume import segment_volume  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ORGANS = ["liver", "spleen", "kidney_left", "kidney_right"]
logger = logging.getLogger("bench.active_learning")


def score(model: ProGiDiffModel, volume: Volume, args: argparse.Namespace) -> float:
    """The app's `proposal_uncertainty` score of one image (every `slice_stride`-th slice)."""
    pipeline = ProGiDiffPipeline.from_model(model, show_progress=False)
    sampled = torch.from_numpy(volume.image[:, :, :: args.slice_stride])
    proposals = segment_volume(pipeline, sampled, ORGANS, args.score_proposals, args.score_steps, seed=0)
    return disagreement(proposals.probabilities)


def run_strategy(strategy: str, weak: ProGiDiffModel, start: list[Volume], pool: list[Volume], test: list[Volume],
                 args: argparse.Namespace, work: Path) -> list[dict]:
    model = copy.deepcopy(weak)
    model.unet.requires_grad_(False)  # fine-tuning steers, as the app's trainer does
    labelled, pool, rng = list(start), list(pool), random.Random(args.seed)
    rounds = []
    for r in range(1, args.rounds + 1):
        started = time.time()
        if strategy == "proposal_disagreement":
            scores = {v.name: score(model, v, args) for v in pool}
            chosen = max(pool, key=lambda v: (scores[v.name], v.name))
        else:
            scores, chosen = {}, rng.choice(pool)
        pool = [v for v in pool if v is not chosen]
        labelled.append(chosen)
        config = TrainConfig(max_steps=args.finetune_steps, learning_rate=args.finetune_lr, val_every=0,
                             checkpoint_every=0, val_proposals=2, val_steps=5, val_organs=",".join(ORGANS),
                             seed=args.seed + r)
        result = train_on_volumes(model, labelled, test, config, work / f"{strategy}_{r}")
        rounds.append({"round": r, "picked": chosen.name, "pool_scores": scores, "dice": result["dice"],
                       "mean_dice": result["mean_dice"], "seconds": round(time.time() - started, 1)})
        logger.info("%s round %d: picked %s → mean Dice %.3f", strategy, r, chosen.name, result["mean_dice"])
    return rounds


def plot(results: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for strategy, rounds in results["strategies"].items():
        xs = [0] + [r["round"] for r in rounds]
        ax.plot(xs, [results["weak"]["mean_dice"]] + [r["mean_dice"] for r in rounds], marker="o", label=strategy)
    ax.set_xlabel("round (labelled images added)")
    ax.set_ylabel("mean consensus Dice (held-out phantoms)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pool", type=int, default=6, help="unlabelled phantoms to pick from")
    parser.add_argument("--test", type=int, default=2, help="held-out phantoms scored after each round")
    parser.add_argument("--weak-steps", type=int, default=400, help="training steps of the weak start model")
    parser.add_argument("--finetune-steps", type=int, default=150)
    parser.add_argument("--finetune-lr", type=float, default=1e-4)
    parser.add_argument("--score-proposals", type=int, default=3)
    parser.add_argument("--score-steps", type=int, default=3)
    parser.add_argument("--slice-stride", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "active_learning.json")
    args = parser.parse_args()
    configure_cli_logging()
    logging.getLogger("progidiff").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    start_time = time.time()

    start = phantom_volumes(1, 5000)  # the one labelled image the weak model knows
    pool = phantom_volumes(args.pool, 5001)
    test = phantom_volumes(args.test, 5100)
    torch.manual_seed(args.seed)
    weak = ProGiDiffModel.from_config(ProGiDiffConfig(organs=list(ORGANS)))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        config = TrainConfig(max_steps=args.weak_steps, encoder_steps=args.weak_steps // 2, val_every=0,
                             checkpoint_every=0, val_proposals=2, val_steps=5, val_organs=",".join(ORGANS), seed=args.seed)
        weak_result = train_on_volumes(weak, start, test, config, work / "weak")
        logger.info("weak model: mean Dice %.3f", weak_result["mean_dice"])
        results = {
            "command": "python bench/active_learning.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
            "weak": {"dice": weak_result["dice"], "mean_dice": weak_result["mean_dice"]},
            "strategies": {s: run_strategy(s, weak, start, pool, test, args, work)
                           for s in ("proposal_disagreement", "random")},
            "torch_threads": torch.get_num_threads(),
            "minutes": round((time.time() - start_time) / 60, 1),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    plot(results, args.out.with_suffix(".png"))
    print("| round | " + " | ".join(results["strategies"]) + " |")
    print("|---|" + "---|" * len(results["strategies"]))
    print("| 0 (weak start) | " + " | ".join(f"{results['weak']['mean_dice']:.3f}" for _ in results["strategies"]) + " |")
    for r in range(args.rounds):
        cells = [f"{rounds[r]['mean_dice']:.3f} ({rounds[r]['picked']})" for rounds in results["strategies"].values()]
        print(f"| {r + 1} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
