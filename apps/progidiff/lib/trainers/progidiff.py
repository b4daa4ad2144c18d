"""MONAI Label train task: fine-tune the published ProGiDiff model on the datastore's final labels.

`POST /train/progidiff` runs MONAI Label's flow (request + defaults → datalist of images with a `final`
label → train/val partition) and then, instead of MONAI's ignite trainer, the project's own loop
(`progidiff.training.DiffusionTrainer`, the one `python -m progidiff.train` runs), so the app and
the CLI train the same way.  The base UNet stays frozen; the control branch learns.

An "epoch" is one pass over the training slices in expectation (slices / batch size steps).  Training
never degrades what is served: before the first step the served model is validated on the same
validation slices, with the same sampler, as every epoch after it (consensus Dice of the EMA weights).
An epoch is published over the served model folder (atomically; the infer task picks it up on its next
request) only when it beats the served model by `publish_margin` and every earlier epoch: a point or two
on one study's validation block is within what epochs of equal quality differ by, and runs that won by
that little were worse on a patient they never saw (bench/app_ct_training.py).  The run's best epoch is always
kept as a candidate beside the run (`<run>/candidate`, reported in the train stats); an admin who wants it
anyway promotes it explicitly: `python -m progidiff.promote <run>/candidate <model folder>`.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from fastapi import HTTPException
from monailabel.interfaces.datastore import Datastore
from monailabel.tasks.train.basic_train import BasicTrainTask, Context
from monailabel.utils.others.generic import strtobool

from lib.datastore import check_name
from progidiff.data import SliceDataset, Volume, load_volume_pair, phantom_volumes, split_slices
from progidiff.io_utils import atomic_file
from progidiff.labels import ORGAN_IDS, class_map_from_label_info
from progidiff.model import ProGiDiffConfig, ProGiDiffModel
from progidiff.phantoms import MAX_PANCREAS_FAT, PancreasVariant
from progidiff.pipeline import prompt_encoder_for
from progidiff.training import DiffusionTrainer, TrainConfig, leave_process_group

logger = logging.getLogger(__name__)

KEY_METRIC = "val_mean_dice"
PHANTOM_SEED = 1000  # the phantoms mixed into a run: seeds from here (the shipped MR adapter's recipe's)
_OWN_LOOP = "ProGiDiffTrain.train runs progidiff.training.DiffusionTrainer, not MONAI's ignite trainer"


class ProGiDiffTrain(BasicTrainTask):
    # The anatomy read-out is trained with the per-organ balanced loss the default model was trained with
    # (progidiff.training.anatomy_loss: small organs learn); adapting to another modality (the LoRA task) also
    # adds MR shading to the augmentation (progidiff.data.augmentation); fine-tuning on CT does not.
    balanced_anatomy = True
    bias_field = False
    modality = "CT"  # of the studies this task trains on (and of the phantoms it may mix in)

    def __init__(self, model_path: str | Path, run_dir: str | Path, settings: Any,
                 publish_path: str | Path | None = None, config: dict[str, Any] | None = None,
                 description: str = "Fine-tune the ProGiDiff control branch on labelled images (base frozen)"):
        super().__init__(
            model_dir=str(run_dir),
            description=description,
            config={
                "max_epochs": 10,
                "learning_rate": 1e-4,
                "val_split": 0.2,
                "train_batch_size": 8,
                "val_proposals": 2,
                "val_steps": 5,
                "multi_gpu": False,  # true: one process per GPU of `gpus` (torch.distributed; see `train`)
                # As the shipped models' recipes train (model/README.md; measured in bench/app_ct_training.py and
                # bench/app_mr_training.py): procedural patients of this task's modality mixed in
                # (`training_groups`), the datastore at `real_weight` of the samples, and a non-contrast CT
                # study's samples moved to an enhanced phase at `contrast_rate` (`training_set`).
                "phantoms": 8,
                "real_weight": 0.8,
                # Lean phantom glands: the CT recipe's last stage gives them fat (`--pancreas-fat 0.5`), which in
                # fine-tuning from one study was no better (bench/README.md, "Fatty phantom glands in fine-tuning").
                "pancreas_fat": 0.0,
                "contrast_rate": 0.6,
                "publish_margin": 0.02,  # validation mean Dice an epoch must gain over the served model to replace it
                **(config or {}),
            },
            publish_path=str(publish_path or model_path),
            labels=dict(ORGAN_IDS),
        )
        self.model_path = str(model_path)  # the served model this task starts from
        self.settings = settings
        for key in ("dataset", "dataloader", "val_batch_size", "early_stop_patience"):
            self._config.pop(key, None)  # MONAI's ignite options; this loop does not use them

    def option_bounds(self) -> dict[str, tuple[type, float, float]]:
        """Train options a request may set: (type, lowest, highest), for the options this task has."""
        bounds = {"max_epochs": (int, 1, 10000), "learning_rate": (float, 1e-8, 1.0), "train_batch_size": (int, 1, 256),
                  "val_split": (float, 0.0, 0.9), "val_proposals": (int, 1, self.settings.max_proposals),
                  "val_steps": (int, 1, 200), "phantoms": (int, 0, 64), "real_weight": (float, 0.05, 1.0),
                  "pancreas_fat": (float, 0.0, round(MAX_PANCREAS_FAT - 0.01, 2)),
                  "contrast_rate": (float, 0.0, 1.0), "publish_margin": (float, 0.0, 1.0)}
        return {key: bound for key, bound in bounds.items() if key in self._config}

    def check_request(self, params: dict[str, Any]) -> None:
        """Refuse bad options (HTTP 400, saying what is accepted) before MONAI Label submits the run."""
        for key, (kind, low, high) in self.option_bounds().items():
            if key not in params:
                continue
            value = params[key]
            try:
                number = None if isinstance(value, bool) else kind(value)
                whole = kind is not int or float(value) == number
            except (TypeError, ValueError, OverflowError):
                number, whole = None, False
            if number is None or not whole or not low <= number <= high:
                raise HTTPException(400, f"train option '{key}' must be {'an integer' if kind is int else 'a number'} "
                                         f"from {low:g} to {high:g}; got {value!r}"[:300])
        if "name" in params:
            check_name("run name", params["name"])
        if "multi_gpu" in params:
            try:
                params["multi_gpu"] = strtobool(params["multi_gpu"])
            except (AttributeError, TypeError, ValueError):
                raise HTTPException(400, f"train option 'multi_gpu' must be true or false; got {params['multi_gpu']!r}"[:300]) from None
        gpus = str(params.get("gpus", "all"))
        if gpus != "all" and not all(g.strip().isdigit() for g in gpus.split(",")):
            raise HTTPException(400, f"train option 'gpus' must be 'all' or device numbers such as '0,1'; got {gpus!r}"[:300])

    # BasicTrainTask's hooks for MONAI's ignite trainer.  `train` runs the ProGiDiff loop instead, which
    # owns its network, optimizer, losses, transforms and sampler (progidiff.training).
    def network(self, context: Context) -> ProGiDiffModel:
        model = ProGiDiffModel.from_pretrained(self.model_path)  # fine-tune what is served now
        model.unet.requires_grad_(False)  # the base is never trained here, only steered
        return model

    def optimizer(self, context: Context):
        raise NotImplementedError(_OWN_LOOP)

    def loss_function(self, context: Context):
        raise NotImplementedError(_OWN_LOOP)

    def train_pre_transforms(self, context: Context):
        raise NotImplementedError(_OWN_LOOP)

    def train_post_transforms(self, context: Context):
        raise NotImplementedError(_OWN_LOOP)

    def val_inferer(self, context: Context):
        raise NotImplementedError(_OWN_LOOP)

    def pre_process(self, request: dict, datastore: Datastore) -> list[dict]:
        """Datalist of final labels, each with the id → name map its label was saved with (if any)."""
        datalist = []
        for image_id in datastore.get_labeled_images():
            info = datastore.get_label_info(image_id, "final")
            datalist.append({
                "image": datastore.get_image_uri(image_id),
                "label": datastore.get_label_uri(image_id, "final"),
                "class_map": class_map_from_label_info(info),
                "id": image_id,
            })
        if not datalist:
            raise ValueError("no labelled images: save a 'final' label for at least one image before training")
        return datalist

    def train(self, rank: int, world_size: int, request: dict, datalist: list[dict]) -> dict:
        """One process's training; with `multi_gpu` MONAI Label spawns `world_size` of them (one per GPU of
        `gpus`) and each joins the process group first."""
        context = Context()
        context.request, context.datalist = request, datalist
        # MONAI Label passes its GPU count as `world_size` even when it runs one process (no `multi_gpu`).
        context.local_rank, context.world_size = rank, world_size if request.get("multi_gpu") else 1
        context.start_ts = int(time.time())
        context.run_id = request["run_id"]
        context.output_dir = str(Path(self._model_dir) / request["name"] / request["run_id"])
        device = self._join_process_group(rank, world_size, request) if request.get("multi_gpu") else \
            torch.device(request["device"] if torch.cuda.is_available() else "cpu")
        if device.type == "cpu" and (threads := self.cpu_threads(context.world_size)):
            torch.set_num_threads(threads)
        try:
            return self._train(context, device)
        finally:
            leave_process_group()

    def cpu_threads(self, processes: int) -> int:
        """Threads for one training process on CPU; 0: leave torch's default.

        `--conf train_threads` if set.  Otherwise, with several processes, the cores split between them, as
        torchrun does: torch's default (every core) in each runs more OpenMP threads than there are cores, and a
        team whose threads wait for a core stalls at every operation (on 2 cores, tests/test_distributed.py's
        two-rank run took 110 s with every core per rank, 55-58 s with one thread each).
        """
        if self.settings.train_threads:
            return self.settings.train_threads
        return max(1, torch.get_num_threads() // processes) if processes > 1 else 0

    def _join_process_group(self, rank: int, world_size: int, request: dict) -> torch.device:
        """torch.distributed as MONAI Label's own trainers join it (its `distributed_backend` / `distributed_url`
        request keys), with defaults that work without a GPU too: gloo on CPUs, and a rendezvous file of this
        run (every spawned process computes the same name)."""
        cuda = torch.cuda.is_available()
        rendezvous = Path(self._model_dir) / request["name"] / f".rendezvous_{request['run_id']}"
        rendezvous.parent.mkdir(parents=True, exist_ok=True)
        dist.init_process_group(backend=request.get("distributed_backend") or ("nccl" if cuda else "gloo"),
                                init_method=request.get("distributed_url") or f"file://{rendezvous}",
                                rank=rank, world_size=world_size)
        if not cuda:
            return torch.device("cpu")
        gpus = str(request.get("gpus", "all"))
        index = rank if gpus == "all" else int(gpus.split(",")[rank])
        torch.cuda.set_device(index)
        return torch.device("cuda", index)

    def _train(self, context: Context, device: torch.device) -> dict:
        request = context.request
        main = context.local_rank == 0

        model = self.network(context)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        model_size = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)  # adapters aside
        context.trainable = {"trainable_parameters": trainable, "trainable_share": round(trainable / model_size, 5)}
        logger.info("trainable parameters: %d (%.2f %% of the model)", trainable, 100 * context.trainable["trainable_share"])
        spacing = model.config.spacing_mm
        train_list, val_list = self.partition_datalist(context)
        train_volumes = [self._load(item, spacing) for item in train_list]
        val_volumes = [self._load(item, spacing) for item in val_list]
        if not val_volumes:  # too few images to hold one out: validate on a z-block of each
            train_volumes, val_volumes = _hold_out_blocks(train_volumes, float(request["val_split"]))

        train_set = self.training_set(train_volumes, request, model.config)
        organs, groups = train_set.organs, train_set.groups
        batch = int(request["train_batch_size"])
        # An epoch shows the datastore's slices once on average, however many phantoms are mixed in.
        real_slices, real_weight = len(train_set.slices[-1]), groups[-1][1]
        context.mix = {"phantoms": len(groups[0][0]) if len(groups) > 1 else 0, "real_weight": real_weight,
                       "pancreas_fat": float(request["pancreas_fat"]), "contrast_rate": train_set.contrast_rate,
                       "unenhanced_ct_studies": sum(v.unenhanced_ct for v in train_volumes)}
        steps_per_epoch = max(1, math.ceil(real_slices / (batch * real_weight)))
        epochs = int(request["max_epochs"])
        config = TrainConfig(
            max_steps=epochs * steps_per_epoch,
            batch_size=batch,
            learning_rate=float(request["learning_rate"]),
            val_every=steps_per_epoch,
            checkpoint_every=0,
            val_proposals=int(request["val_proposals"]),
            val_steps=int(request["val_steps"]),
            val_organs=",".join(organs),
            balanced_anatomy=self.balanced_anatomy,
        )
        logger.info("training on %d images (%d slices with an organ; %d non-contrast CT, %.0f %% of their samples in "
                    "an enhanced phase)%s, validating on %d; %d epochs × %d steps on %s",
                    len(train_volumes), real_slices, context.mix["unenhanced_ct_studies"],
                    100 * train_set.contrast_rate,
                    f" and {context.mix['phantoms']} phantoms" if context.mix["phantoms"] else "", len(val_volumes),
                    epochs, steps_per_epoch, device)
        publisher = _EpochPublisher(self, context, steps_per_epoch, epochs, float(request["publish_margin"]))
        trainer = DiffusionTrainer(model, prompt_encoder_for(model), train_set, val_volumes, config,
                                   context.output_dir, device=device, on_validation=publisher if main else None)
        publisher.trainer = trainer
        if main:  # rank 0 alone validates and publishes
            publisher.served = self.served_validation(trainer).get("mean_dice", -1.0)
            logger.info("served model: validation mean Dice %.3f; an epoch is published only if it beats this by %g",
                        publisher.served, publisher.margin)
        trainer.fit()
        return publisher.finish() if main else {}

    def training_set(self, volumes: list[Volume], request: dict, config: ProGiDiffConfig) -> SliceDataset:
        """Random training samples of the datastore's volumes and the phantoms mixed in (`training_groups`).

        A non-contrast CT study (`Volume.unenhanced_ct`; MR never is) has `contrast_rate` of its samples moved to
        an enhanced phase, as the default model's recipe moves its real CT (`--contrast-rate`): trained on
        non-contrast studies alone, the model would forget that organs and vessels can be bright."""
        groups = self.training_groups(volumes, int(request["phantoms"]), float(request["real_weight"]),
                                      float(request["pancreas_fat"]))
        return SliceDataset(groups, config.image_size, list(config.organs) or list(ORGAN_IDS), seed=0,
                            bias_field=self.bias_field, contrast_rate=float(request.get("contrast_rate", 0.0)),
                            context_slices=config.context_slices)

    def training_groups(self, volumes: list[Volume], phantoms: int, real_weight: float, pancreas_fat: float = 0.0
                        ) -> list[tuple[list[Volume], float]]:
        """(volumes, share of the samples) to train on: the datastore's labelled volumes last, and before them,
        when `phantoms` > 0 and `real_weight` < 1, that many procedural patients of this task's modality, as the
        shipped models' recipes mix them (model/README.md): a few labelled studies show a few levels and one
        body; phantoms show every level and keep organs they lack in their adult size ranges. `pancreas_fat`: the
        phantoms' glands draw a fat share up to it (`progidiff.phantoms.PancreasVariant`; 0: lean)."""
        if not phantoms or real_weight >= 1.0:
            return [(volumes, 1.0)]
        start = time.time()
        synthetic = [self.prepared(v) for v in phantom_volumes(phantoms, PHANTOM_SEED, self.modality.lower(),
                                                               pancreas=PancreasVariant(fat=pancreas_fat))]
        logger.info("%d %s phantoms (seeds %d-%d, pancreas fat up to %g) at %.0f %% of the samples (%.0f s)",
                    phantoms, self.modality, PHANTOM_SEED, PHANTOM_SEED + phantoms - 1, pancreas_fat,
                    100 * (1 - real_weight), time.time() - start)
        return [(synthetic, 1.0 - real_weight), (volumes, real_weight)]

    def prepared(self, volume: Volume) -> Volume:
        """A volume as the model reads it in training (CT: in HU, as loaded)."""
        return volume

    def served_validation(self, trainer: DiffusionTrainer) -> dict:
        """What is served now, validated as every epoch will be: before the first step the EMA weights are the
        served model's."""
        return trainer.validate()

    def save_to(self, trainer: DiffusionTrainer, directory: str | Path) -> None:
        """Write the EMA weights as a model folder (atomic folder swap)."""
        trainer.save_model(directory)

    def publish(self, trainer: DiffusionTrainer) -> None:
        """Replace the served model folder with the EMA weights."""
        self.save_to(trainer, self._publish_path)

    def _load(self, item: dict, spacing: float) -> Volume:
        volume = load_volume_pair(item["image"], item["label"], item.get("class_map") or "schema", spacing=spacing)
        return self.prepared(volume)


def _hold_out_blocks(volumes: list[Volume], share: float) -> tuple[list[Volume], list[Volume]]:
    """Keep the top `share` of each volume's z-slices (a block, at least one slice) for validation."""
    train, val = [], []
    for volume in volumes:
        depth = volume.image.shape[2]
        size = min(depth - 1, max(1, round(depth * share)))
        kept, held = split_slices(volume, range(depth - size, depth))
        train.extend(kept)
        val.extend(held)
    return train, val


class _EpochPublisher:
    """After each epoch's validation: write MONAI Label train stats; keep the run's best epoch as the candidate,
    and publish it over the served model only when it beats the served model's validation by `margin` (and
    earlier epochs)."""

    def __init__(self, task: ProGiDiffTrain, context: Context, steps_per_epoch: int, epochs: int, margin: float):
        self.task = task
        self.context = context
        self.steps_per_epoch = steps_per_epoch
        self.epochs = epochs
        self.trainer: DiffusionTrainer | None = None
        self.served = -1.0  # validation mean Dice of the served model before this run
        self.margin = margin  # what an epoch must gain over it to be published
        self.best = -1.0  # of this run's epochs
        self.best_epoch = 0
        self.published_epoch: int | None = None
        self.history: list[dict] = []

    @property
    def candidate_path(self) -> Path:
        return Path(self.context.output_dir) / "candidate"

    def __call__(self, step: int, entry: dict) -> None:
        epoch = math.ceil(step / self.steps_per_epoch)
        metrics = {KEY_METRIC: entry["mean_dice"], **{f"val_dice_{o}": v for o, v in entry["dice"].items()}}
        self.history.append({"epoch": epoch, "step": step, **metrics})
        if entry["mean_dice"] > self.best:
            self.best, self.best_epoch = entry["mean_dice"], epoch
            self.task.save_to(self.trainer, self.candidate_path)
            if self.best > self.served + self.margin:  # a new best of the run beats every earlier epoch too
                self.task.publish(self.trainer)
                self.published_epoch = epoch
                logger.info("epoch %d: validation mean Dice %.3f beats the served model's %.3f by more than %g → "
                            "published to %s", epoch, self.best, self.served, self.margin, self.task._publish_path)
            else:
                logger.info("epoch %d: validation mean Dice %.3f does not beat the served model's %.3f by more than %g: "
                            "kept as the candidate %s, not published", epoch, self.best, self.served, self.margin,
                            self.candidate_path)
        self._write_stats(epoch, metrics, done=epoch >= self.epochs)

    def finish(self) -> dict:
        return self.task.stats()

    def _write_stats(self, epoch: int, metrics: dict, done: bool) -> None:
        """The shape MONAI Label's own trainer writes (shown under `train_stats` in /info)."""
        elapsed = str(datetime.timedelta(seconds=int(time.time() - self.context.start_ts)))
        stats = {
            "name": self.context.request["name"],
            "run_id": self.context.run_id,
            "epoch": epoch,
            "max_epochs": self.epochs,
            "start_ts": self.context.start_ts,
            "total_time" if done else "current_time": elapsed,
            "best_metric": self.best,
            "eval": {"metrics": metrics, "key_metric_name": KEY_METRIC, "best_metric": self.best,
                     "best_metric_epoch": self.best_epoch},
            "history": self.history,
            "tensorboard": str(Path(self.context.output_dir) / "tensorboard"),
            "processes": self.context.world_size,
            "served_val_mean_dice": self.served,
            "publish_margin": self.margin,
            "published": self.published_epoch is not None,
            "published_epoch": self.published_epoch,
            "published_to": self.task._publish_path,
            "candidate": str(self.candidate_path),
            **getattr(self.context, "trainable", {}),
            **getattr(self.context, "mix", {}),
        }
        with atomic_file(self.task._stats_path, suffix=".json") as tmp:
            Path(tmp).write_text(json.dumps(stats, indent=2))
