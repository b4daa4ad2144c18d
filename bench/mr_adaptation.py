"""Benchmark: MR with the shipped adapter — the CT model vs the adapter vs full fine-tuning of the control branch.

Cases, per organ:
- real MR `../shared/data/mr_a`, its held-out z-slices (the adapter's recipe adapts on z 0-4 + 10-14 and leaves
  out z 5-9 + 15-19: interleaved blocks put every organ in both halves; a single split at z 10 leaves the spleen
  69 of its 1941 voxels to adapt on and the left kidney 15 voxels to be scored on);
- fresh MR-like phantoms (seeds 6100…), which neither the adapter nor the fine-tuning saw (they adapt on seeds
  1000-1007).
Rows:
- `ct_model`: the bare CT model on the study as it is (what a user without an adapter gets);
- `adapter`: `model/adapters/mr` (or `--adapter`), on the study rescaled as the adapter records;
- `full_finetune`: the whole control branch (the base UNet frozen, as POST /train/progidiff) trained here on the
  same data (the real MR's adaptation slices; 8 MR phantoms and 4 pseudo-MR renderings of the labelled real CT
  `ct_a_full` at a 20 % share) with the same loss,
  normalisation, augmentation, steps and batch as the adapter's recipe.
Scores: consensus Dice, best-of-N Dice and the consensus's HD95 (mm) of N proposals at the served defaults
(N = 5, 1 step, seed 0) on every held-out slice; the share of full fine-tuning's gain over the CT model that the
adapter recovers, per organ; trainable parameters and training minutes.  JSON beside a Markdown table.

    .venv/bin/python bench/mr_adaptation.py --threads 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from progidiff import lora
from progidiff.data import Volume, load_volume_pair, normalised, phantom_volumes, split_slices
from progidiff.evaluate import score_proposals
from progidiff.intensity import PercentileNormalisation, normalisation_for
from progidiff.labels import ORGAN_IDS
from progidiff.logs import configure_cli_logging
from progidiff.model import ProGiDiffModel
from progidiff.pipeline import ProGiDiffPipeline
from progidiff.pseudo_mr import pseudo_mr_volumes
from progidiff.train import parse_ranges
from progidiff.training import TrainConfig, train_on_volumes
from progidiff.volume import segment_volume

# bench/held_out.py, beside this script; CT_A_FULL is rendered as pseudo-MR, as in the adapter recipe
from held_out import CT_A_FULL, MR_A, MR_A_HELD_OUT

ROOT = Path(__file__).resolve().parents[1]
ORGANS = ["liver", "spleen", "kidney_left", "kidney_right"]
logger = logging.getLogger("bench.mr_adaptation")


def score(model: ProGiDiffModel, studies: list[list[Volume]], normalisation: PercentileNormalisation | None,
          args: argparse.Namespace) -> dict:
    """Per organ: consensus / best Dice and HD95 of each study over all its slices, the mean over studies.
    A study is a list of contiguous runs of slices (the held-out block is two), each segmented on its own so
    that a 2.5D model never reads a slice beyond its run as a neighbour, and scored together."""
    pipeline = ProGiDiffPipeline.from_model(model, device="cpu", show_progress=False)
    per_volume = []
    for runs in studies:
        label = np.concatenate([run.label for run in runs], axis=2)
        wanted = [o for o in ORGANS if (label == ORGAN_IDS[o]).any()]
        proposals = [segment_volume(pipeline, torch.from_numpy(normalised(run, normalisation).image), wanted,
                                    args.proposals, args.sampling_steps, args.seed) for run in runs]
        pooled = dataclasses.replace(proposals[0], probabilities=torch.cat([p.probabilities for p in proposals], dim=4))
        per_volume.append(score_proposals(pooled, label, runs[0].spacing))
    result = {}
    for organ in ORGANS:
        rows = [v[organ] for v in per_volume if organ in v]
        hd = [r["hd95_consensus"] for r in rows if r["hd95_consensus"] is not None]
        result[organ] = {"dice": round(sum(r["dice_consensus"] for r in rows) / len(rows), 4),
                         "dice_best": round(sum(r["dice_best"] for r in rows) / len(rows), 4),
                         "hd95": round(sum(hd) / len(hd), 1) if len(hd) == len(rows) else None}
    return result


def model_size(model: ProGiDiffModel) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)


def with_adapter(model_dir: Path, adapter: Path) -> tuple[ProGiDiffModel, PercentileNormalisation | None, int]:
    """The model with the MR adapter active; the intensity rescaling the adapter records; its parameter count."""
    model = ProGiDiffModel.from_pretrained(model_dir)
    config = lora.load_adapter(model, adapter, "mr")
    lora.activate(model, "mr")
    trainable = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    return model, PercentileNormalisation.from_dict(config.get("intensity")), trainable


def full_finetune(adaptation: list[Volume], args: argparse.Namespace, work: Path) -> tuple[ProGiDiffModel, int, float]:
    model = ProGiDiffModel.from_pretrained(args.model)
    model.unet.requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    config = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, learning_rate=args.full_lr, val_every=0,
                         checkpoint_every=0, balanced_anatomy=True)
    started = time.time()
    synthetic = phantom_volumes(args.adapt_phantoms, 1000, "mr")
    if args.pseudo_mr_variants:
        ct = load_volume_pair(CT_A_FULL / "image.nii.gz", CT_A_FULL / "label.nii.gz", "total", spacing=3.0)
        synthetic += pseudo_mr_volumes(ct, args.pseudo_mr_variants)
    phantoms = [normalised(v, normalisation_for("MR")) for v in synthetic]
    train_on_volumes(model, adaptation, [], config, work, bias_field=True,
                     mixed_with=(phantoms, 1.0 - args.real_weight))
    return model, trainable, (time.time() - started) / 60


def recovered(ct: dict, adapter: dict, full: dict) -> dict:
    """Per organ: the share of full fine-tuning's gain over the CT model that the adapter recovers."""
    out = {}
    for organ in ORGANS:
        gain = full[organ]["dice"] - ct[organ]["dice"]
        out[organ] = round((adapter[organ]["dice"] - ct[organ]["dice"]) / gain, 3) if gain > 0.01 else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "model" / "progidiff_ct")
    parser.add_argument("--adapter", type=Path, default=ROOT / "model" / "adapters" / "mr")
    parser.add_argument("--steps", type=int, default=1500,
                        help="full fine-tuning steps (the adapter recipe's); 0: the CT model and the adapter only")
    parser.add_argument("--adapt-phantoms", type=int, default=8,
                        help="MR phantoms (seeds 1000…) mixed into the full fine-tuning, as in the adapter recipe")
    parser.add_argument("--pseudo-mr-variants", type=int, default=4,
                        help="pseudo-MR renderings of ct_a_full mixed in with the phantoms, as in the adapter recipe")
    parser.add_argument("--real-weight", type=float, default=0.8, help="the real MR's share of the samples (recipe's)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--full-lr", type=float, default=1e-4)
    parser.add_argument("--phantoms", type=int, default=2, help="fresh MR phantoms scored (seeds 6100…)")
    parser.add_argument("--proposals", type=int, default=5)
    parser.add_argument("--sampling-steps", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "mr_adaptation.json")
    args = parser.parse_args()
    configure_cli_logging()
    logging.getLogger("progidiff").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not MR_A.is_dir():
        raise SystemExit(f"{MR_A} is absent: the bench scores the real MR's held-out block")
    started = time.time()
    study = load_volume_pair(MR_A / "image.nii.gz", MR_A / "label.nii.gz", "total_mr", spacing=3.0)
    adaptation, held_out = split_slices(study, parse_ranges(MR_A_HELD_OUT))
    cases = {"mr_a held-out block (z 5-9, 15-19)": [held_out],
             f"fresh MR phantoms ({args.phantoms})": [[v] for v in phantom_volumes(args.phantoms, 6100, "mr")]}

    adapted, adapter_normalisation, adapter_trainable = with_adapter(args.model, args.adapter)
    full, full_trainable, full_minutes = None, 0, 0.0
    if args.steps:
        with tempfile.TemporaryDirectory() as work:
            runs = [normalised(v, normalisation_for("MR")) for v in adaptation]
            full, full_trainable, full_minutes = full_finetune(runs, args, Path(work))
        logger.info("full fine-tuning: %.1f min", full_minutes)
    ct = ProGiDiffModel.from_pretrained(args.model)
    size = model_size(ct)
    results = {"command": "python bench/mr_adaptation.py " + " ".join(
                   f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out", "model", "adapter")),
               "model": str(args.model), "adapter": str(args.adapter), "model_parameters": size,
               "adapter_trainable": adapter_trainable, "adapter_share": round(adapter_trainable / size, 4),
               "full_trainable": full_trainable, "full_share": round(full_trainable / size, 4),
               "full_minutes": round(full_minutes, 1), "torch_threads": torch.get_num_threads(), "cases": {}}
    for name, volumes in cases.items():
        rows = {"ct_model": score(ct, volumes, None, args),
                "adapter": score(adapted, volumes, adapter_normalisation, args)}
        results["cases"][name] = {"rows": rows}
        if full is not None:
            rows["full_finetune"] = score(full, volumes, normalisation_for("MR"), args)
            results["cases"][name]["adapter_recovers"] = recovered(rows["ct_model"], rows["adapter"],
                                                                   rows["full_finetune"])
        logger.info("%s: %s", name, json.dumps(results["cases"][name]))
    results["minutes"] = round((time.time() - started) / 60, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(table(results))


def table(results: dict) -> str:
    lines = ["| case | model | " + " | ".join(ORGANS) + " | trainable (share) |", "|---|---|" + "---|" * (len(ORGANS) + 1)]
    trainable = {"ct_model": "0", "adapter": f"{results['adapter_trainable']} ({100 * results['adapter_share']:.1f} %)",
                 "full_finetune": f"{results['full_trainable']} ({100 * results['full_share']:.1f} %)"}
    for name, case in results["cases"].items():
        for row, scores in case["rows"].items():
            cells = " | ".join(f"{s['dice']:.3f} ({s['dice_best']:.3f}; {s['hd95'] if s['hd95'] is not None else '–'} mm)"
                               for s in (scores[o] for o in ORGANS))
            lines.append(f"| {name} | {row} | {cells} | {trainable[row]} |")
        if "adapter_recovers" not in case:
            continue
        shares = " | ".join("–" if v is None else f"{100 * v:.0f} %" for v in case["adapter_recovers"].values())
        lines.append(f"| {name} | adapter recovers of full fine-tuning's gain | {shares} | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
