"""Benchmark: few-shot MR adaptation of the CT model — LoRA vs full fine-tuning of the control branch.

Cases:
- real MR `../shared/data/mr_a` (TotalSegmentator MR ids): z-slices 0-9 adapt, 10-19 evaluate (blocks, so no
  evaluated slice has a trained neighbour); LoRA on 1, 3 and all 10 adaptation slices;
- MR-like phantoms: LoRA on 1 and 3 phantom volumes, evaluated on a fresh MR phantom.
For each: consensus Dice per organ (the trainers' validation: N proposals, every other slice) of the CT
model as is, of each LoRA, and of full fine-tuning of the control branch on all adaptation data (same
steps); trainable parameters and CPU seconds.  Writes JSON and a PNG plot; prints a Markdown table.

    .venv/bin/python bench/mr_adaptation.py --out bench/results/mr_adaptation.json
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from progidiff import lora  # noqa: E402
from progidiff.data import SliceDataset, Volume, load_volume_pair, phantom_volumes, split_slices  # noqa: E402
from progidiff.model import ProGiDiffModel  # noqa: E402
from progidiff.pipeline import prompt_encoder_for  # noqa: E402
from progidiff.training import DiffusionTrainer, TrainConfig, train_on_volumes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MR_A = ROOT.parent / "shared" / "data" / "mr_a"
ORGANS = ["liver", "spleen", "kidney_left", "kidney_right"]
logger = logging.getLogger("bench.mr_adaptation")


def evaluate(model: ProGiDiffModel, test: list[Volume], args: argparse.Namespace, work: Path) -> dict:
    """The trainers' validation (consensus Dice with the real sampler) without training."""
    config = TrainConfig(val_proposals=args.proposals, val_steps=args.sampling_steps, val_organs=",".join(ORGANS))
    train_set = SliceDataset([(test, 1.0)], model.config.image_size, ORGANS)
    return DiffusionTrainer(model, prompt_encoder_for(model), train_set, test, config, work).validate()


def adapt(base_dir: Path, kind: str, volumes: list[Volume], test: list[Volume], args: argparse.Namespace,
          work: Path) -> dict:
    model = ProGiDiffModel.from_pretrained(base_dir)
    model.config.organs = ORGANS
    if kind == "lora":
        lora.add_adapter(model, "mr", lora.LoraSettings(rank=args.rank, alpha=args.rank))
        learning_rate = args.lora_lr
    else:  # full fine-tuning of the control branch, base frozen (what POST /train/progidiff does)
        model.unet.requires_grad_(False)
        learning_rate = args.full_lr
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    config = TrainConfig(max_steps=args.steps, learning_rate=learning_rate, val_every=0, checkpoint_every=0,
                         val_proposals=args.proposals, val_steps=args.sampling_steps, val_organs=",".join(ORGANS),
                         batch_size=args.batch_size)
    started = time.time()
    result = train_on_volumes(model, volumes, test, config, work)
    return {"dice": result["dice"], "mean_dice": result["mean_dice"], "trainable_parameters": trainable,
            "trainable_share": round(trainable / total, 5), "train_seconds": round(time.time() - started, 1)}


def run_case(name: str, base_dir: Path, shots: dict[str, list[Volume]], full: list[Volume], test: list[Volume],
             args: argparse.Namespace, work: Path) -> dict:
    rows = {"ct_model": {**evaluate(ProGiDiffModel.from_pretrained(base_dir), test, args, work / "eval"),
                         "trainable_parameters": 0, "train_seconds": 0.0}}
    for label, volumes in shots.items():
        rows[f"lora_{label}"] = adapt(base_dir, "lora", volumes, test, args, work / f"lora_{label}")
        logger.info("%s lora_%s: %.3f", name, label, rows[f"lora_{label}"]["mean_dice"])
    rows["full_finetune"] = adapt(base_dir, "full", full, test, args, work / "full")
    gain_full = rows["full_finetune"]["mean_dice"] - rows["ct_model"]["mean_dice"]
    best_lora = max((r for k, r in rows.items() if k.startswith("lora_")), key=lambda r: r["mean_dice"])
    recovered = (best_lora["mean_dice"] - rows["ct_model"]["mean_dice"]) / gain_full if gain_full > 0 else None
    return {"case": name, "rows": rows, "lora_gain_recovered": recovered}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "model" / "progidiff_ct")
    parser.add_argument("--steps", type=int, default=200, help="training steps of every adaptation")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument("--full-lr", type=float, default=1e-4)
    parser.add_argument("--proposals", type=int, default=3)
    parser.add_argument("--sampling-steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "mr_adaptation.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("progidiff").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if MR_A.is_dir():
            volume = load_volume_pair(MR_A / "image.nii.gz", MR_A / "label.nii.gz", "total_mr", spacing=3.0)
            adaptation, held_out = split_slices(volume, range(10, volume.image.shape[2]))
            middle = adaptation.image.shape[2] // 2
            one, _ = split_slices(adaptation, [z for z in range(adaptation.image.shape[2]) if z != middle])
            three, _ = split_slices(adaptation, [z for z in range(adaptation.image.shape[2]) if z not in (2, 5, 8)])
            cases.append(run_case("mr_a (real MR), z 10-19 held out", args.model,
                                  {"1_slice": [one], "3_slices": [three], "10_slices": [adaptation]},
                                  [adaptation], [held_out], args, work / "mr_a"))
        else:
            logger.warning("%s is absent: the real-MR case is skipped", MR_A)
        phantoms = phantom_volumes(3, 6000, "mr")
        test = phantom_volumes(1, 6100, "mr")
        cases.append(run_case("MR phantoms, fresh phantom 6100", args.model,
                              {"1_volume": phantoms[:1], "3_volumes": phantoms}, phantoms, test, args, work / "phantoms"))
    results = {"command": "python bench/mr_adaptation.py " + " ".join(
                   f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out", "model")),
               "model": str(args.model), "cases": cases, "torch_threads": torch.get_num_threads(),
               "minutes": round((time.time() - started) / 60, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    plot(results, args.out.with_suffix(".png"))
    print("| case | setting | " + " | ".join(ORGANS) + " | mean | trainable params (share) | train s |")
    print("|---|---|" + "---|" * (len(ORGANS) + 3))
    for case in cases:
        for setting, row in case["rows"].items():
            dice = " | ".join(f"{row['dice'].get(o, float('nan')):.3f}" for o in ORGANS)
            share = f"{row['trainable_parameters']} ({100 * row.get('trainable_share', 0):.2f} %)"
            print(f"| {case['case']} | {setting} | {dice} | {row['mean_dice']:.3f} | {share} | {row['train_seconds']:.0f} |")
        recovered = case["lora_gain_recovered"]
        print(f"| {case['case']} | best LoRA recovers | {'–' if recovered is None else f'{100 * recovered:.0f} %'} "
              "of full fine-tuning's gain |" + " |" * (len(ORGANS) + 2))


def plot(results: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, len(results["cases"]), figsize=(5 * len(results["cases"]), 3.5), squeeze=False)
    for ax, case in zip(axes[0], results["cases"]):
        names = list(case["rows"])
        ax.bar(range(len(names)), [case["rows"][n]["mean_dice"] for n in names], color="tab:blue")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_ylim(0, 1)
        ax.set_title(case["case"], fontsize=9)
        ax.set_ylabel("mean consensus Dice")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
