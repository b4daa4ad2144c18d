"""The training loop shared by `python -m progidiff.train` and the MONAI Label trainer.

`DiffusionTrainer` trains ProGiDiff, `BaselineTrainer` the deterministic baseline, through one loop.
One ProGiDiff step: a batch of (slice, organ phrase, mask) → mask to the denoised space → DDPM noise at a
random timestep → the model's prediction (x0 for the compact model) → MSE to the target.

Diffusion from scratch learns anatomy slowly on a CPU budget, so the scan encoder's 1×1 organ head
is trained with Dice + BCE on every organ of the slice (deep supervision).  It gives the control
branch strong, prompt-independent anatomy features early and, in the compact x0 model, the organ
prior that the proposals vary around.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel
from monai.networks.layers import GaussianFilter
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from .data import SliceDataset, Volume
from .io_utils import atomic_file
from .labels import ORGAN_IDS
from .metrics import dice
from .model import ProGiDiffModel
from .pipeline import ProGiDiffPipeline, organ_channels, prompt_encoder_for
from .proposals import MASK_THRESHOLD, summarise
from .text import PromptEncoder
from .volume import axial_slices

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    max_steps: int = 2000
    max_minutes: float = 0.0  # 0: no time limit; counts the training time of every launch of a resumed run
    batch_size: int = 8
    learning_rate: float = 3e-4
    weight_decay: float = 1e-4
    ema_decay: float = 0.995
    anatomy_weight: float = 1.0  # weight of the scan encoder's deterministic anatomy loss
    balanced_anatomy: bool = True  # anatomy BCE averaged per organ over its inside and outside (see anatomy_loss);
    # the baseline's loss too, so that both models of a comparison learn small organs the same way
    mask_weight: float = 1.0  # weight of the soft Dice of the predicted clean mask (x0-prediction, pixel space)
    low_noise_bias: float = 0.0  # >0 samples timesteps more often near t=0 (sharper final steps)
    encoder_steps: int = 0  # the first steps train only the scan encoder, as a deterministic segmenter
    encoder_minutes: float = 0.0  # >0: the encoder-only phase also ends after this much training time, so that
    # on a slower machine the time budget (max_minutes) still leaves the whole model its share (0: steps alone)
    val_every: int = 500
    checkpoint_every: int = 200
    val_proposals: int = 2
    val_steps: int = 5
    val_organs: str = "liver,spleen,kidney_left,kidney_right"
    seed: int = 0


def soft_dice_loss(probability: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of 1 − soft Dice; the +1 keeps empty targets (negative prompts) well defined."""
    dims = tuple(range(1, probability.ndim))
    inter = (probability * target).sum(dim=dims)
    return (1 - (2 * inter + 1) / (probability.sum(dim=dims) + target.sum(dim=dims) + 1)).mean()


def anatomy_loss(logits: torch.Tensor, label: torch.Tensor, balanced: bool = False) -> torch.Tensor:
    """Soft Dice + BCE of per-organ logits [B,K,h,w] against a schema label map [B,1,H,W].

    `balanced`: the BCE is the mean over each organ's inside plus the mean over its outside, instead of the
    mean over every pixel.  Adapting to a new modality needs it: the CT model's organ logits sit far below
    zero on MR (≈ −30 for spleen and kidneys on `mr_a`), where the soft Dice's gradient vanishes and a
    pixel-mean BCE gives a small organ's few pixels almost no say beside the liver's; with it, every organ
    present pulls as hard as the liver (measured in model/README.md, "MR adapter").  Small organs on CT need it
    as much: trained with the pixel-mean BCE, the default recipe's pancreas and duodenum logits stayed below −5
    on every pixel (model/README.md, "Why the balanced anatomy loss").
    """
    one_hot = torch.stack([(label[:, 0] == v).float() for v in ORGAN_IDS.values()], dim=1)
    target = F.interpolate(one_hot, size=logits.shape[-2:], mode="area")
    prob = logits.sigmoid()
    inter = (prob * target).sum(dim=(2, 3))
    denom = prob.sum(dim=(2, 3)) + target.sum(dim=(2, 3))
    present = target.sum(dim=(2, 3)) > 0
    soft_dice = 1 - (2 * inter + 1) / (denom + 1)
    dice_term = soft_dice[present].mean() if present.any() else logits.sum() * 0
    if not balanced:
        return F.binary_cross_entropy_with_logits(logits, target) + dice_term
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    inside = (bce * target).sum(dim=(2, 3)) / target.sum(dim=(2, 3)).clamp_min(1e-6)
    outside = (bce * (1 - target)).sum(dim=(2, 3)) / (1 - target).sum(dim=(2, 3)).clamp_min(1e-6)
    return (inside * present + outside).mean() + dice_term


def boundary_shift(noise: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per sample, a boundary shift in [-1, 1] read from its diffusion noise [B,C,h,w] inside the organ.

    The noise summed over the organ's n pixels (`masks` [B,1,H,W], resized to the noise), over √n, is
    a standard normal: Φ of it is uniform.  Tying the target's shift to it (more positive noise on
    the organ → larger mask) puts the shift in the noisy input at every noise level, so that a model
    that learns to read it lets the sampler's starting noise decide a proposal's boundary (the same
    noise on every slice, see the pipeline: one coherent proposal in 3D).  The organ's own pixels, not
    the whole map: the UNet's group norms remove a map's mean, not its contrast.  Empty mask: no shift.
    Measured so far (model/README.md): neither 600 fine-tuning steps nor the whole recipe learnt it.
    """
    region = F.interpolate(masks.float(), size=noise.shape[-2:], mode="area") >= 0.5
    region = region.expand_as(noise).flatten(1).float()
    count = region.sum(dim=1)
    z = (noise.flatten(1).float() * region).sum(dim=1) / count.clamp_min(1).sqrt()
    return torch.where(count > 0, 2 * torch.special.ndtr(z) - 1, torch.zeros_like(z))


def jitter_boundaries(masks: torch.Tensor, pixels: float, shift: torch.Tensor) -> torch.Tensor:
    """Each mask [B,1,H,W] grown (shift > 0) or shrunk (< 0) as a whole by `shift` [B] × `pixels`.

    One reference mask per slice would teach the diffusion model a single answer, and its proposals
    would not differ.  Readers differ mostly in where they put an organ's boundary, consistently over
    the organ, and models err the same way (e.g. kidneys drawn too small): targets whose boundary
    moves that way teach the model a spread of plausible boundaries around the anatomy, which the
    proposals sample.  The mask is blurred (Gaussian, sigma = `pixels`) and thresholded at Φ(−shift):
    a straight boundary moves out by `pixels` · shift.  A mask that shrinking would empty (a thin
    organ) is kept as it was.
    """
    if pixels <= 0:
        return masks
    blurred = GaussianFilter(spatial_dims=2, sigma=pixels)(masks.float())
    level = torch.special.ndtr(-shift.to(blurred)).view(-1, 1, 1, 1)
    moved = (blurred > level).to(masks.dtype)
    emptied = (moved.sum(dim=(1, 2, 3)) == 0) & (masks.sum(dim=(1, 2, 3)) > 0)
    return torch.where(emptied.view(-1, 1, 1, 1), masks, moved)


def sample_timesteps(batch: int, num_train: int, low_noise_bias: float, generator: torch.Generator) -> torch.Tensor:
    u = torch.rand(batch, generator=generator)
    if low_noise_bias > 0:
        u = u ** (1.0 + low_noise_bias)
    return (u * num_train).long().clamp(max=num_train - 1)


def diffusion_target(scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    kind = scheduler.config.prediction_type
    if kind == "sample":
        return x0
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    raise ValueError(f"Unsupported prediction_type {kind!r}")


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) of this process in torch.distributed's default group; (0, 1) outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def leave_process_group() -> None:
    """Destroy torch.distributed's default group, if this process joined one, now, while the interpreter and the
    other ranks are alive; call it once the trainer is out of use.

    A trainer and its DistributedDataParallel form a reference cycle (through the loss), and DDP holds the group:
    without a collection first, the gloo group and its threads outlive `destroy_process_group` until interpreter
    exit, where tearing them down can abort the process ("terminate called without an active exception",
    SIGABRT), typically on a rank that finished before the others.
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


class _LossOfBatch(nn.Module):
    """The model and the trainer's loss as one module, so that DistributedDataParallel sees every forward (the
    encoder warm-up does not go through the model's forward) and averages the gradients of all ranks."""

    def __init__(self, model: nn.Module, loss: Callable[[dict], dict[str, torch.Tensor]]):
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        return self.loss(batch)


class Trainer:
    """The loop shared by both models: steps within a step and time budget, EMA, checkpoints and resume,
    progress logs, TensorBoard scalars, validation Dice on held-out volumes.  Subclasses define one
    training step and how to predict probabilities for validation.

    Under torch.distributed (torchrun, or MONAI Label's `multi_gpu`), one trainer per process: the model is
    wrapped in DistributedDataParallel (gradients averaged over the ranks), each rank draws its own share of
    `batch_size` from its own random stream of slices (the dataset is an endless random sampler, so this is
    what a distributed sampler gives it), and rank 0 alone validates, logs, writes TensorBoard and
    checkpoints, and calls `on_validation` (which publishes).  Every rank stops at the same step.
    """

    def __init__(
        self,
        model: nn.Module,
        train_set: SliceDataset,
        val_volumes: list[Volume],
        config: TrainConfig,
        out_dir: str | Path,
        device: torch.device | str = "cpu",
        on_validation: Callable[[int, dict], None] | None = None,
    ):
        self.model = model.to(device)
        self.train_set = train_set
        self.val_volumes = val_volumes
        self.config = config
        self.out_dir = Path(out_dir)
        self.device = torch.device(device)
        self.on_validation = on_validation
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.ema = EMAModel(self.params, decay=config.ema_decay)
        self.rank, self.world_size = distributed_rank()
        if config.batch_size % self.world_size:
            raise ValueError(f"batch_size {config.batch_size} does not split over {self.world_size} processes")
        self.generator = torch.Generator().manual_seed(config.seed + self.rank)
        self.step = 0
        self.trained_seconds = 0.0  # training time of the launches before this one (from the checkpoint)
        self._launch_started: float | None = None  # when this launch's `fit` began
        self.whole_model_from: int | None = None  # the step the encoder-only phase ended at (None: not yet)
        self.history: list[dict] = []
        self.losses: list[float] = []  # the loss of every step (averaged over the ranks), for the train record
        self.writer = SummaryWriter(str(self.out_dir / "tensorboard")) if self.is_main else None
        self.loss_of_batch: nn.Module = _LossOfBatch(self.model, self.loss)
        if self.world_size > 1:
            train_set.reseed(config.seed + self.rank)
            self.loss_of_batch = nn.parallel.DistributedDataParallel(
                self.loss_of_batch, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True)  # the encoder warm-up leaves the UNet out of the graph

    @property
    def is_main(self) -> bool:
        """Rank 0 (the only process without torch.distributed): the one that validates, logs and saves."""
        return self.rank == 0

    # ---- what subclasses define ----------------------------------------------------------------
    has_encoder_phase = False  # DiffusionTrainer: its first `encoder_steps` train the scan encoder alone

    def loss(self, batch: dict) -> dict[str, torch.Tensor]:
        """Loss terms of one batch; the key "loss" is what is minimised."""
        raise NotImplementedError

    def predict(self, images: torch.Tensor, organs: list[str]) -> torch.Tensor:
        """Probabilities [N, B, P, H, W] for slices [B, 1, H, W] (N proposals)."""
        raise NotImplementedError

    # ---- checkpoints ---------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / "checkpoint.pt"

    def save_checkpoint(self) -> None:
        if not self.is_main:
            return
        state = {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.state_dict(),
            "generator": self.generator.get_state(),
            "history": self.history,
            "trained_seconds": self.elapsed(),
            "whole_model_from": self.whole_model_from,
        }
        with atomic_file(self.checkpoint_path, suffix=".pt") as tmp:
            torch.save(state, tmp)

    def resume(self) -> bool:
        """Continue from `checkpoint.pt` in the output folder, if one is there."""
        if not self.checkpoint_path.is_file():
            return False
        state = torch.load(self.checkpoint_path, map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.ema.load_state_dict(state["ema"])
        self.generator.set_state(state["generator"])
        self.step, self.history = state["step"], state["history"]
        self.trained_seconds = state.get("trained_seconds", 0.0)  # checkpoints before 2026-12-02: no clock
        ended = self.config.encoder_steps if self.step >= self.config.encoder_steps else None
        self.whole_model_from = state.get("whole_model_from", ended)
        if self.world_size > 1:  # the checkpoint holds rank 0's stream: each rank goes on with its own
            self.generator.manual_seed(self.config.seed + self.rank + 7919 * self.step)
            self.train_set.reseed(self.config.seed + self.rank + 7919 * self.step)
        logger.info("resumed from %s at step %d", self.checkpoint_path, self.step)
        return True

    # ---- one step ------------------------------------------------------------------------------
    def training_step(self, batch: dict) -> dict[str, float]:
        self.model.train()
        losses = self.loss_of_batch(batch)
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.ema.step(self.params)
        values = torch.stack([v.detach().float() for v in losses.values()])
        if self.world_size > 1:  # what the whole (global) batch scored
            dist.all_reduce(values)
            values /= self.world_size
        return dict(zip(losses, values.tolist()))

    # ---- budgets -------------------------------------------------------------------------------
    def elapsed(self) -> float:
        """Seconds this run has trained, over every launch: a resumed run keeps its clock, so its time budget
        means the same whether or not it was interrupted."""
        launch = time.time() - self._launch_started if self._launch_started is not None else 0.0
        return self.trained_seconds + launch

    def _agreed(self, decision: bool) -> bool:
        """Under torch.distributed rank 0's decision (its clock) holds for every rank."""
        if self.world_size > 1:
            flag = torch.tensor([float(decision)])
            dist.broadcast(flag, src=0)
            decision = bool(flag.item())
        return decision

    def should_stop(self) -> bool:
        """Step or time budget spent."""
        cfg = self.config
        out_of_time = bool(cfg.max_minutes and self.elapsed() > cfg.max_minutes * 60)
        return self._agreed(self.step >= cfg.max_steps or out_of_time)

    @property
    def in_encoder_phase(self) -> bool:
        """The scan encoder trains alone (the warm-up of `encoder_steps`), the rest of the model is untouched."""
        return self.has_encoder_phase and self.config.encoder_steps > 0 and self.whole_model_from is None

    def _end_encoder_phase_when_due(self) -> None:
        """End the encoder-only phase at `encoder_steps`, or earlier when `encoder_minutes` of training are spent."""
        cfg = self.config
        by_time = bool(cfg.encoder_minutes and self.elapsed() > cfg.encoder_minutes * 60)
        if not self.in_encoder_phase or not self._agreed(self.step >= cfg.encoder_steps or by_time):
            return
        self.whole_model_from = self.step
        if self.step < cfg.encoder_steps:
            logger.warning("encoder-only phase ended by its time budget (%g min) at step %d of %d: the whole model "
                           "trains from here", cfg.encoder_minutes, self.step, cfg.encoder_steps)
        else:
            logger.info("encoder-only phase done at step %d after %.1f min: the whole model trains from here",
                        self.step, self.elapsed() / 60)

    # ---- validation ----------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict:
        """Consensus and best-proposal Dice per organ on held-out slices, with the EMA weights."""
        if not self.val_volumes:
            return {}
        with self.ema_weights():
            self.model.eval()
            scores: dict[str, list[float]] = {}
            best: dict[str, list[float]] = {}
            organs = [o for o in self.config.val_organs.split(",") if o in self.train_set.organs]
            for volume in self.val_volumes:
                wanted = [o for o in organs if (volume.label == ORGAN_IDS[o]).any()]
                if not wanted:
                    continue
                label = volume.label[:, :, ::2]  # every other slice: half the cost, same picture
                images = axial_slices(volume.image, self.train_set.context_slices)[::2]
                probabilities = self.predict(images, wanted)
                for p, organ in enumerate(wanted):
                    reference = torch.from_numpy(label == ORGAN_IDS[organ]).permute(2, 0, 1)
                    summary = summarise(probabilities[:, :, p])
                    scores.setdefault(organ, []).append(dice(summary.consensus, reference))
                    best.setdefault(organ, []).append(
                        max(dice(probabilities[k, :, p] >= MASK_THRESHOLD, reference) for k in range(probabilities.shape[0]))
                    )
            result = {
                "dice": {o: sum(v) / len(v) for o, v in scores.items()},
                "dice_best": {o: sum(v) / len(v) for o, v in best.items()},
            }
            result["mean_dice"] = sum(result["dice"].values()) / max(len(result["dice"]), 1)
            return result

    # ---- the loop ------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train to the step or time budget; the final validation entry (rank 0; {} on the other ranks)."""
        cfg = self.config
        loader = torch.utils.data.DataLoader(self.train_set, batch_size=cfg.batch_size // self.world_size,
                                             num_workers=0)
        start = self._launch_started = time.time()
        running: dict[str, float] = {}
        logger.info(
            "training %d trainable parameters for up to %d steps%s%s",
            sum(p.numel() for p in self.params),
            cfg.max_steps,
            f" / {cfg.max_minutes:g} min" if cfg.max_minutes else "",
            f" on {self.world_size} processes (rank {self.rank})" if self.world_size > 1 else "",
        )
        first = self.step
        for batch in loader:
            if self.should_stop():
                break
            self._end_encoder_phase_when_due()
            losses = self.training_step(batch)
            self.step += 1
            self.losses.append(round(losses["loss"], 5))
            if not self.is_main:
                continue
            for k, v in losses.items():
                running[k] = 0.98 * running.get(k, v) + 0.02 * v
                self.writer.add_scalar(f"train/{k}", v, self.step)
            if self.step % 25 == 0 or self.step == first + 1:
                terms = "  ".join(f"{k} {v:.4f}" for k, v in running.items())
                logger.info("step %d/%d  %s  %.2f s/step", self.step, cfg.max_steps, terms,
                            (time.time() - start) / (self.step - first))
            if cfg.val_every and self.step % cfg.val_every == 0:
                self._record_validation()
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.save_checkpoint()
        self.trained_seconds, self._launch_started = self.elapsed(), None  # the clock stops with the loop
        if not self.is_main:
            return {}
        if self.step < cfg.max_steps:
            logger.warning("the time budget (%g min) ended the run at step %d of %d", cfg.max_minutes, self.step,
                           cfg.max_steps)
        validated_now = bool(self.history) and self.history[-1]["step"] == self.step
        final = self.history[-1] if validated_now else self._record_validation()
        self.save_checkpoint()
        self.writer.close()
        return final

    def _record_validation(self) -> dict:
        result = self.validate()
        if not result:
            return {}
        entry = {"step": self.step, "minutes": round(self.elapsed() / 60, 2), **result}
        self.history.append(entry)
        self.writer.add_scalar("val/mean_dice", result["mean_dice"], self.step)
        for organ, value in result["dice"].items():
            self.writer.add_scalar(f"val/dice_{organ}", value, self.step)
        logger.info("validation at step %d: mean Dice %.3f %s", self.step, result["mean_dice"],
                    json.dumps({k: round(v, 3) for k, v in result["dice"].items()}))
        if self.on_validation is not None:
            self.on_validation(self.step, entry)
        return entry

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """The EMA weights in the model for the duration (to save or score them), the live ones after."""
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        try:
            yield
        finally:
            self.ema.restore(self.params)

    def save_model(self, directory: str | Path) -> None:
        """Publish the EMA weights as a model folder (atomically)."""
        with self.ema_weights():
            self.model.save_pretrained(directory)


class DiffusionTrainer(Trainer):
    """ProGiDiff: diffusion loss on the prompted organ's mask + the scan encoder's anatomy loss."""

    has_encoder_phase = True

    def __init__(self, model: ProGiDiffModel, prompt_encoder: PromptEncoder, *args, **kwargs):
        super().__init__(model, *args, **kwargs)
        self.prompt_encoder = prompt_encoder
        self.scheduler = DDPMScheduler.from_config(model.scheduler_config)
        self.direct_mask_loss = model.vae is None and self.scheduler.config.prediction_type == "sample"

    def loss(self, batch: dict) -> dict[str, torch.Tensor]:
        if self.in_encoder_phase:
            return self.encoder_loss(batch)
        image = batch["image"].to(self.device)
        size = self.model.working_size
        noise = torch.randn(len(batch["organ"]), self.model.mask_channels, size, size, generator=self.generator)
        noise = noise.to(self.device)
        mask = batch["mask"].to(self.device)
        jitter = self.model.config.boundary_jitter
        if jitter > 0:
            mask = jitter_boundaries(mask, jitter, boundary_shift(noise, mask))
        x0 = self.model.encode_mask(mask)
        text = self.prompt_encoder.encode(list(batch["text"])).to(self.device)
        num_train = self.scheduler.config.num_train_timesteps
        t = sample_timesteps(x0.shape[0], num_train, self.config.low_noise_bias, self.generator).to(self.device)
        organ_index = organ_channels(batch["organ"], self.device)
        noisy = self.scheduler.add_noise(x0, noise, t)
        prediction, logits = self.model(noisy, t, text, image, organ_index, return_organ_logits=True)
        terms = {"diffusion": F.mse_loss(prediction.float(), diffusion_target(self.scheduler, x0, noise, t).float())}
        terms["anatomy"] = anatomy_loss(logits, batch["label"].to(self.device), self.config.balanced_anatomy)
        if self.direct_mask_loss:
            # x0 is the mask itself: also score it as a segmentation (SDSeg's direct mask estimation).
            predicted = ((prediction.float() + 1) / 2).clamp(0, 1)
            terms["mask"] = soft_dice_loss(predicted, (x0 + 1) / 2)
        weights = {"diffusion": 1.0, "anatomy": self.config.anatomy_weight, "mask": self.config.mask_weight}
        return {"loss": sum(weights[k] * v for k, v in terms.items()), **terms}

    def encoder_loss(self, batch: dict) -> dict[str, torch.Tensor]:
        """Warm-up: the scan encoder alone learns anatomy (Dice + BCE on every organ), at a deterministic
        segmenter's cost per step, so that the diffusion stage starts from a strong organ prior."""
        encoder = self.model.scan_encoder
        logits = encoder.organ_logits(encoder.features(batch["image"].to(self.device)))
        anatomy = anatomy_loss(logits, batch["label"].to(self.device), self.config.balanced_anatomy)
        return {"loss": anatomy, "anatomy": anatomy}

    def predict(self, images: torch.Tensor, organs: list[str]) -> torch.Tensor:
        pipeline = ProGiDiffPipeline(self.model, self.prompt_encoder, device=self.device, show_progress=False)
        return pipeline(images, organs, self.config.val_proposals, self.config.val_steps, seed=self.config.seed).probabilities


class BaselineTrainer(Trainer):
    """The deterministic MONAI UNet: Dice + BCE on every organ of the slice."""

    def loss(self, batch: dict) -> dict[str, torch.Tensor]:
        logits = self.model(batch["image"].to(self.device))
        return {"loss": anatomy_loss(logits, batch["label"].to(self.device), self.config.balanced_anatomy)}

    def predict(self, images: torch.Tensor, organs: list[str]) -> torch.Tensor:
        return self.model.predict(images, organs)


def train_on_volumes(model: ProGiDiffModel, volumes: list[Volume], val_volumes: list[Volume], config: TrainConfig,
                     out_dir: str | Path, device: torch.device | str = "cpu", bias_field: bool = False,
                     mixed_with: tuple[list[Volume], float] | None = None) -> dict:
    """Train `model` in place on `volumes` (its trainable parameters only) and leave the EMA weights in it,
    as a published model would have them.  Returns the final validation entry ({} without `val_volumes`).
    `bias_field`: MR shading in the augmentation; `mixed_with`: other volumes (e.g. phantoms) and their share of
    the samples, as `train.py --phantoms --real-weight` mixes them."""
    others, share = mixed_with or ([], 0.0)  # SliceDataset leaves out an empty group
    train_set = SliceDataset([(volumes, 1.0 - share), (others, share)], model.config.image_size,
                             list(model.config.organs), seed=config.seed, bias_field=bias_field,
                             context_slices=model.config.context_slices)
    trainer = DiffusionTrainer(model, prompt_encoder_for(model), train_set, val_volumes, config, out_dir, device=device)
    final = trainer.fit()
    trainer.ema.copy_to(trainer.params)
    return final
