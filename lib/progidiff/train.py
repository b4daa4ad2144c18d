"""`python -m progidiff.train`: train a ProGiDiff model on phantoms and/or labelled volumes.

Example (the default model's recipe is in model/README.md):
    python -m progidiff.train --out runs/default --phantoms 120 \\
        --volume ../shared/data/ct_a/image.nii.gz ../shared/data/ct_a/label.nii.gz total --hold-out 10:18 \\
        --max-minutes 55

With `--lora NAME --init-from MODEL` it trains a LoRA adapter on that model instead (the MR adapter's
recipe is in model/README.md) and writes the adapter alone to `<out>/adapter`.  `--modality mr` rescales
every volume per study (`progidiff.intensity`) and adds MR shading to the augmentation.

On several processes (CPU cores, GPUs, nodes), launch it with torchrun; `--batch-size` stays the global batch:
    torchrun --nproc-per-node 2 -m progidiff.train --out runs/ddp ...
    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29400 -m progidiff.train ...
Rank 0 validates, logs, checkpoints and writes the model; `--out` must be a folder every node sees (resume).

`--max-minutes` is the run's training time over every launch (a resumed run keeps its clock). `--encoder-steps N`
trains the scan encoder alone first; `--encoder-minutes M` ends that phase after M minutes even if N steps are not
done, so that on a slow machine the budget still leaves the whole model its share.  A run that ends inside that
phase writes no model: its diffusion UNet has not trained.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from . import lora
from .baseline import BaselineConfig, BaselineSegmenter, is_baseline_folder
from .data import SliceDataset, Volume, load_volume_pair, normalised, phantom_volumes, split_slices
from .intensity import normalisation_for
from .io_utils import atomic_file
from .labels import ORGAN_IDS
from .logs import configure_cli_logging
from .model import ProGiDiffConfig, ProGiDiffModel
from .phantoms import PancreasVariant, add_pancreas_arguments
from .pipeline import prompt_encoder_for
from .pseudo_ct import pseudo_ct_volumes
from .pseudo_mr import pseudo_mr_volumes
from .training import BaselineTrainer, DiffusionTrainer, TrainConfig, Trainer, leave_process_group

logger = logging.getLogger("progidiff.train")


def parse_ranges(text: str) -> list[int]:
    """"10:18" or "5:10,15:20" → the z indices."""
    indices: list[int] = []
    for part in text.split(","):
        start, stop = (int(v) for v in part.split(":"))
        indices.extend(range(start, stop))
    return indices


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="run folder: checkpoint, tensorboard, model/")
    p.add_argument("--phantoms", type=int, default=0, help="number of synthetic CT phantoms to train on")
    p.add_argument("--phantom-seed", type=int, default=1000, help="first phantom seed (sample-datasets use 0..)")
    p.add_argument("--val-phantoms", type=int, default=1, help="fresh phantoms kept for validation")
    p.add_argument("--modality", choices=["ct", "mr"], default="ct",
                   help="phantom contrast; mr also rescales every volume per study and adds MR shading")
    p.add_argument("--volume", nargs=3, action="append", default=[], metavar=("IMAGE", "LABEL", "LABEL_MAP"),
                   help="a labelled volume; LABEL_MAP is schema, total, total_mr or a JSON file")
    p.add_argument("--pseudo-mr", nargs=3, action="append", default=[], metavar=("IMAGE", "LABEL", "LABEL_MAP"),
                   help="a labelled CT rendered as MR-like (progidiff.pseudo_mr): real anatomy at every level, "
                        "trained on with the phantoms' share of the samples")
    p.add_argument("--pseudo-mr-variants", type=int, default=4,
                   help="renderings of each --pseudo-mr CT (each a different draw of MR contrast and noise)")
    p.add_argument("--pseudo-ct", nargs=3, action="append", default=[], metavar=("IMAGE", "LABEL", "LABEL_MAP"),
                   help="a labelled MR rendered as CT (progidiff.pseudo_ct): another patient's real anatomy for a "
                        "CT model, trained on with --pseudo-ct-weight of the samples")
    p.add_argument("--pseudo-ct-variants", type=int, default=4,
                   help="renderings of each --pseudo-ct MR (each a different patient draw: phase, values, noise)")
    p.add_argument("--pseudo-ct-hold-out", type=parse_ranges, default=None, metavar="Z0:Z1[,Z2:Z3]",
                   help="z-slices of each --pseudo-ct MR never trained on (those the MR adapter is scored on)")
    p.add_argument("--pseudo-ct-weight", type=float, default=0.2,
                   help="share of samples drawn from the --pseudo-ct renderings (taken from the phantoms' share)")
    add_pancreas_arguments(p, fat_reaches="the phantoms and --pseudo-ct renderings")
    p.add_argument("--hold-out", type=parse_ranges, default=None, metavar="Z0:Z1[,Z2:Z3]",
                   help="z-slices of each --volume kept for validation (e.g. 10:18, or 5:10,15:20)")
    p.add_argument("--real-weight", type=float, default=0.35, help="share of samples drawn from --volume data")
    p.add_argument("--contrast-rate", type=float, default=0.0,
                   help="share of the samples from a real non-contrast CT --volume moved to a random contrast "
                        "phase (progidiff.contrast); 0: as scanned")
    p.add_argument("--fat-aware-contrast", action="store_true",
                   help="in those phases enhance only the parenchyma of each organ's voxels, fat staying as it "
                        "reads (the real pancreas with fat between its lobules); without it every voxel of an "
                        "organ moves alike, as the default model's recipe has it")
    p.add_argument("--organs", default="", help="comma list of schema organs (default: all)")
    p.add_argument("--init-from", type=Path, default=None,
                   help="start from this model folder (with --baseline, a baseline model folder)")
    p.add_argument("--spacing-mm", type=float, default=3.0, help="in-plane spacing volumes are resampled to")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--mask-size", type=int, default=64)
    p.add_argument("--channels", default="16,32,64,64", help="compact UNet block widths")
    p.add_argument("--encoder-channels", default="16,32", help="scan encoder stage widths")
    p.add_argument("--full-size-readout", action="store_true",
                   help="organ read-out at --image-size, not --mask-size (model/README.md: tried, not adopted)")
    p.add_argument("--context-slices", type=int, default=None, metavar="K",
                   help="2.5D: the model reads K neighbouring axial slices each side with the slice (default: the "
                        "--init-from model's, else 0)")
    p.add_argument("--boundary-jitter", type=float, default=None, metavar="PX",
                   help="proposals' boundary spread: training masks grow or shrink by up to PX pixels, tied to "
                        "the diffusion noise (default: the --init-from model's, else 0)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda")
    p.add_argument("--baseline", action="store_true",
                   help="train the deterministic MONAI UNet baseline instead, on the same data and budget")
    p.add_argument("--lora", default="", metavar="NAME",
                   help="train a LoRA adapter NAME on the --init-from model (frozen) and write it to <out>/adapter")
    p.add_argument("--lora-rank", type=int, default=8, help="the adapter's rank (alpha = rank)")
    for field, value in asdict(TrainConfig()).items():
        if isinstance(value, bool):
            p.add_argument(f"--{field.replace('_', '-')}", action=argparse.BooleanOptionalAction, default=value)
        else:
            p.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    return p


def context_slices(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """The neighbours each side the model reads: none for the baseline (it reads one slice), an --init-from
    model's own (its scan encoder was built for them), else --context-slices."""
    if args.baseline:
        if args.context_slices:
            parser.error("--context-slices is for the ProGiDiff model; the baseline reads one slice")
        return 0
    if args.init_from:
        own = ProGiDiffConfig.load(args.init_from).context_slices
        if args.context_slices not in (None, own):
            parser.error(f"--context-slices {args.context_slices}: the --init-from model reads {own}")
        return own
    if args.context_slices is not None and not 0 <= args.context_slices <= 4:
        parser.error(f"--context-slices must be 0 to 4; got {args.context_slices}")
    return args.context_slices or 0


def lora_settings(args: argparse.Namespace) -> lora.LoraSettings:
    return lora.LoraSettings(rank=args.lora_rank, alpha=float(args.lora_rank))


def build_model(args: argparse.Namespace, organs: list[str]) -> ProGiDiffModel:
    if args.init_from:
        model = ProGiDiffModel.from_pretrained(args.init_from)
    else:
        torch.manual_seed(args.seed)
        config = ProGiDiffConfig(
            spacing_mm=args.spacing_mm,
            image_size=args.image_size,
            mask_size=args.mask_size,
            compact_channels=tuple(int(c) for c in args.channels.split(",")),
            encoder_channels=tuple(int(c) for c in args.encoder_channels.split(",")),
            full_size_readout=args.full_size_readout,
            context_slices=args.context_slices,
        )
        model = ProGiDiffModel.from_config(config)
    if args.boundary_jitter is not None:
        model.config.boundary_jitter = args.boundary_jitter
    if args.lora:
        lora.add_adapter(model, args.lora, lora_settings(args))
    else:
        model.config.organs = organs
    return model


def build_trainer(args: argparse.Namespace, organs: list[str], train_args: tuple, device: torch.device) -> Trainer:
    if args.baseline:
        torch.manual_seed(args.seed)
        if args.init_from:
            model = BaselineSegmenter.from_pretrained(args.init_from)
        else:
            config = BaselineConfig(image_size=args.image_size, spacing_mm=args.spacing_mm, organs=tuple(organs))
            model = BaselineSegmenter(config)
        return BaselineTrainer(model, *train_args, device=device)
    model = build_model(args, organs)
    return DiffusionTrainer(model, prompt_encoder_for(model, args.init_from), *train_args, device=device)


def process_device(requested: str) -> torch.device:
    """This process's device; under torchrun (WORLD_SIZE > 1) it first joins the process group through torchrun's
    env:// rendezvous (NCCL between GPUs, gloo between CPU processes) and takes the GPU of its local rank."""
    use_cuda = torch.cuda.is_available() and requested != "cpu"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if not use_cuda:
        return torch.device("cpu")
    return torch.device("cuda", local_rank if dist.is_initialized() else torch.cuda.current_device())


@dataclass
class TrainingData:
    synthetic: list[Volume]  # phantoms and pseudo-MR
    real: list[Volume]  # the --volume studies' training slices
    pseudo_ct: list[Volume]  # the --pseudo-ct renderings' training slices
    validation: list[Volume]

    def sample_groups(self, real_weight: float, pseudo_ct_weight: float) -> list[tuple[list[Volume], float]]:
        """(volumes, share of the samples) for `SliceDataset`: the synthetic volumes take what the others leave,
        and a run with nothing synthetic draws from what it has in their shares' proportions."""
        groups = [(self.real, real_weight), (self.pseudo_ct, pseudo_ct_weight)]
        groups = [(volumes, weight) for volumes, weight in groups if volumes]
        rest = 1.0 - sum(weight for _, weight in groups)
        return [(self.synthetic, rest), *groups] if self.synthetic else groups


def load_data(args: argparse.Namespace) -> TrainingData:
    """The run's volumes: phantoms and renderings, the --volume studies split by --hold-out, validation."""
    normalisation = normalisation_for(args.modality)
    phantoms = phantom_volumes(args.phantoms, args.phantom_seed, args.modality, workers=os.cpu_count() or 1,
                               pancreas=PancreasVariant.from_args(args)) if args.phantoms else []
    val = phantom_volumes(args.val_phantoms, args.phantom_seed + 100000, args.modality) if args.val_phantoms else []
    for image, label, label_map in args.pseudo_mr:
        phantoms += pseudo_mr_volumes(load_volume_pair(image, label, label_map, spacing=args.spacing_mm),
                                      args.pseudo_mr_variants)
    phantoms, val = [normalised(v, normalisation) for v in phantoms], [normalised(v, normalisation) for v in val]
    pseudo_ct = []
    for image, label, label_map in args.pseudo_ct:
        renderings = pseudo_ct_volumes(load_volume_pair(image, label, label_map, spacing=args.spacing_mm),
                                       args.pseudo_ct_variants, pancreas_fat=args.pancreas_fat)
        for rendering in renderings:
            pseudo_ct += split_slices(rendering, args.pseudo_ct_hold_out or [])[0]
    real = []
    for image, label, label_map in args.volume:
        volume = normalised(load_volume_pair(image, label, label_map, spacing=args.spacing_mm), normalisation)
        if args.hold_out is not None:
            runs, held_out = split_slices(volume, args.hold_out)
            val.extend(held_out)
            real.extend(runs)
        else:
            real.append(volume)
    return TrainingData(phantoms, real, pseudo_ct, val)


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.lora and (args.baseline or not args.init_from):
        parser.error("--lora adapts a trained model: give --init-from MODEL_DIR (and not --baseline)")
    if args.init_from and args.baseline != is_baseline_folder(args.init_from):
        parser.error(f"--init-from {args.init_from}: " + (
            "--baseline goes on from a baseline model folder (with baseline_config.json)" if args.baseline else
            "that is a baseline model folder; give --baseline to go on training it"))
    if args.pseudo_mr and args.modality != "mr":
        parser.error("--pseudo-mr renders a CT as MR for MR training: give --modality mr")
    if args.pseudo_ct and args.modality != "ct":
        parser.error("--pseudo-ct renders an MR as CT for CT training: leave --modality ct")
    if args.pseudo_ct and args.real_weight + args.pseudo_ct_weight > 1:
        parser.error("--real-weight + --pseudo-ct-weight must be at most 1 (the phantoms take the rest)")
    args.context_slices = context_slices(args, parser)
    configure_cli_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    organs = [o.strip() for o in args.organs.split(",") if o.strip()] or list(ORGAN_IDS)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    data = load_data(args)
    if not data.synthetic and not data.real and not data.pseudo_ct:
        raise SystemExit("nothing to train on: give --phantoms N and/or --volume IMAGE LABEL MAP")
    logger.info("data: %d phantoms / pseudo-MR, %d real volumes (%d runs of training slices, %d of them non-contrast "
                "CT), %d pseudo-CT runs, %d validation volumes (%.0f s)", len(data.synthetic), len(args.volume),
                len(data.real), sum(v.unenhanced_ct for v in data.real), len(data.pseudo_ct), len(data.validation),
                time.time() - start)

    device = process_device(args.device)
    try:
        return fit_and_save(args, argv, organs, data, device, start)
    finally:
        leave_process_group()  # every rank, however its run ended


def fit_and_save(args: argparse.Namespace, argv: list[str] | None, organs: list[str], data: TrainingData,
                 device: torch.device, start: float) -> dict:
    """Train (or resume) on `data` and, on rank 0, write the model or adapter and the train record; {} on the
    other ranks."""
    config = TrainConfig(**{k: getattr(args, k) for k in asdict(TrainConfig())})
    groups = data.sample_groups(args.real_weight, args.pseudo_ct_weight)
    train_set = SliceDataset(groups, args.image_size, organs, seed=config.seed, bias_field=args.modality != "ct",
                             contrast_rate=args.contrast_rate, context_slices=args.context_slices,
                             fat_aware_contrast=args.fat_aware_contrast)
    trainer = build_trainer(args, organs, (train_set, data.validation, config, args.out), device)
    trainer.resume()
    first_step, fit_started = trainer.step, time.time()
    final = trainer.fit()
    train_seconds = time.time() - fit_started
    if trainer.in_encoder_phase:  # every rank ends here
        ended_at = trainer.step
        del trainer  # not held by the exception's frame: leave_process_group can free its DDP
        raise SystemExit(f"the run ended at step {ended_at}, inside its encoder-only phase (--encoder-steps "
                         f"{config.encoder_steps}): the diffusion UNet has not trained, so no model was written. "
                         f"The checkpoint in {args.out} is kept: the same command with a larger --max-minutes, or "
                         "with --encoder-minutes, goes on from it.")
    if not trainer.is_main:  # rank 0 writes what the run made
        return {}
    saved = args.out / ("adapter" if args.lora else "model")
    if args.lora:
        with trainer.ema_weights():
            lora.save_adapter(trainer.model, args.lora, saved, lora_settings(args), extra=lora.adapter_record(
                args.modality, args.init_from, normalisation_for(args.modality)))
    else:
        trainer.save_model(saved)
    record = {
        "command": "python -m progidiff.train " + " ".join(argv if argv is not None else sys.argv[1:]),
        "steps": trainer.step,
        "ended_by": "steps" if trainer.step >= config.max_steps else "time",
        "whole_model_from_step": trainer.whole_model_from,  # where the encoder-only phase ended (None: none)
        "wall_minutes": round((time.time() - start) / 60, 2),
        "train_seconds": round(train_seconds, 2),  # the steps of this launch (and their validations)
        "train_minutes_all_launches": round(trainer.trained_seconds / 60, 2),  # what --max-minutes counts
        "steps_this_launch": trainer.step - first_step,
        "torch_threads": torch.get_num_threads(),
        "processes": trainer.world_size,
        "volumes": {"synthetic": len(data.synthetic), "real": len(args.volume), "pseudo_ct": len(data.pseudo_ct),
                    "validation": len(data.validation)},
        "final_validation": final,
        "history": trainer.history,
        "config": asdict(config),
        "losses": trainer.losses,
    }
    with atomic_file(args.out / "train_record.json", suffix=".json") as tmp:
        Path(tmp).write_text(json.dumps(record, indent=2))
    logger.info("%s saved to %s (%.1f min)", "adapter" if args.lora else "model", saved, record["wall_minutes"])
    return record


if __name__ == "__main__":
    main()
