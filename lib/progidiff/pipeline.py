"""Sampling N mask proposals for B slices × P organs in one batched denoising loop.

Shaped like diffusers' ControlNet pipeline: `check_inputs` → `encode_prompt` → `prepare_condition`
→ `encode_scan` → `prepare_latents` → `denoise` (progress bar) → `decode`, one method a step.

The scan encoder runs once per slice: its features are shared by every step, proposal and organ
(before, they were recomputed N·P times per step; the outputs are the same).

The starting noise of proposal k for organ o is drawn from its own generator seeded by (seed, k, o)
and is the same on every slice; so is the noise a stochastic sampler (DDPM) adds at each step.  A user
picks one proposal for the whole organ, so a proposal must be one coherent 3D answer: with independent
noise per slice, the differences between proposals would average out over the slices and every
proposal would score like every other.  It also makes a proposal independent of how the slices are
chunked and of the other organs asked for with it.

With a model that adds an organ prior, proposal k also reads that prior at its own confidence level
(`model.prior_offsets`, `spread`): proposals then run from the tightest to the most generous
boundary the model finds plausible, and differ where the organ's edge is uncertain.

`proposal_noise="shared"` (with such a prior): every proposal of an organ starts from the same noise and
differs only in its prior offset.  The first denoising step is then the same network pass for all N
proposals and runs once (`predict_once_for_all_proposals`); with one step, N proposals cost one.
"independent" gives each proposal its own noise (N passes at every step).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .geometry import from_square, to_square
from .labels import ORGAN_IDS
from .model import ProGiDiffModel, prior_offsets, resolve_base
from .prompts import organ_text
from .schedulers import make_sampler
from .text import PromptEncoder, load_prompt_encoder

logger = logging.getLogger(__name__)

MAX_STEPS = 1000
MAX_SPREAD = 20.0  # organ-prior logits; σ(±20) is certainty, nothing lies beyond
PROPOSAL_NOISE = ("shared", "independent")
# How a request that names none is sampled: the server, the CLIs and the library alike.  With shared noise,
# 1 DDIM step is within 0.3 Dice points of 5 independent ones and 7–22× faster (bench/README.md).
DEFAULT_PROPOSALS = 5
DEFAULT_STEPS = 1
DEFAULT_SCHEDULER = "ddim"
DEFAULT_PROPOSAL_NOISE = "shared"


@dataclass
class ProposalOutput:
    """`probabilities` [N, B, P, H, W]: foreground probability of proposal n, slice b, organ p (CPU, float32)."""

    probabilities: torch.Tensor
    organs: list[str]
    seed: int


def proposal_seed(seed: int, proposal: int, organ: str, stream: str = "start") -> int:
    """A stable 63-bit seed per (request seed, proposal, organ) and noise stream ("start": the starting
    noise, "steps": a stochastic sampler's noise); Python's hash() is salted per process."""
    key = f"{seed}:{proposal}:{organ}" if stream == "start" else f"{seed}:{proposal}:{organ}:{stream}"
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def organ_channels(organs: list[str], device: torch.device) -> torch.Tensor:
    """The organs' channels in the scan encoder's read-out (schema value - 1)."""
    return torch.tensor([ORGAN_IDS[o] - 1 for o in organs], device=device)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """bf16 (or fp16 where bf16 is missing) on CUDA, full fp32 on the CPU, unless told otherwise."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    if precision in ("fp16", "auto"):
        return torch.float16
    raise ValueError(f"Unknown precision {precision!r}; accepted: auto, fp32, bf16, fp16")


def prompt_encoder_for(model: ProGiDiffModel, model_dir: str | Path | None = None) -> PromptEncoder:
    config = model.config
    base = resolve_base(config.base, Path(model_dir) if model_dir else Path.cwd()) if config.is_latent else None
    return load_prompt_encoder(config.text_encoder, base, config.text_max_length)


class ProGiDiffPipeline:
    def __init__(
        self,
        model: ProGiDiffModel,
        prompt_encoder: PromptEncoder,
        scheduler: str = DEFAULT_SCHEDULER,
        device: torch.device | str | None = None,
        precision: str = "auto",
        show_progress: bool = True,
        spread: float | None = None,
        proposal_noise: str = DEFAULT_PROPOSAL_NOISE,
    ):
        """`spread`: the proposals' organ-prior logit range (None: the model's `proposal_spread`);
        `proposal_noise`: "shared" or "independent" starting noise across an organ's proposals (see above)."""
        self.device = torch.device(device) if device is not None else default_device()
        self.model = model.to(self.device).eval()
        self.prompt_encoder = prompt_encoder
        self.scheduler_name = scheduler
        self.autocast = autocast_dtype(self.device, precision)
        self.show_progress = show_progress
        self.spread = self._check_spread(model, spread)
        if proposal_noise not in PROPOSAL_NOISE:
            raise ValueError(f"proposal_noise must be one of {', '.join(PROPOSAL_NOISE)}; got {proposal_noise!r}")
        # Shared noise only where the prior offsets still tell the proposals apart.
        self.shares_noise = proposal_noise == "shared" and self.spread > 0
        make_sampler(scheduler, model.scheduler_config)  # fail now on a bad name, not mid-request
        if prompt_encoder.hidden_size != model.unet.config.cross_attention_dim:
            raise ValueError(
                f"Text encoder width {prompt_encoder.hidden_size} does not match the UNet's cross-attention "
                f"width {model.unet.config.cross_attention_dim}"
            )

    @staticmethod
    def _check_spread(model: ProGiDiffModel, spread: float | None) -> float:
        if spread is None:
            return model.config.proposal_spread if model.uses_organ_prior else 0.0
        if not (isinstance(spread, (int, float)) and 0.0 <= spread <= MAX_SPREAD):
            raise ValueError(f"spread must be a number from 0 to {MAX_SPREAD:g} (organ-prior logits); got {spread!r}")
        if spread > 0 and not model.uses_organ_prior:
            raise ValueError("spread needs a model that adds an organ prior (compact base, x0-prediction); "
                             "this model has none: use spread 0")
        return float(spread)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, **kwargs) -> "ProGiDiffPipeline":
        """Model folder → ready pipeline, with the text encoder the model was trained with."""
        model = ProGiDiffModel.from_pretrained(model_dir)
        return cls(model, prompt_encoder_for(model, model_dir), **kwargs)

    @classmethod
    def from_model(cls, model: ProGiDiffModel, **kwargs) -> "ProGiDiffPipeline":
        return cls(model, prompt_encoder_for(model), **kwargs)

    # ---- steps ---------------------------------------------------------------------------------
    def check_inputs(self, images: torch.Tensor, organs: list[str], num_proposals: int, steps: int) -> None:
        channels = self.model.config.input_slices
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != channels:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            context = channels // 2
            what = f"slices, each with its {context} neighbours each side (z order)" if context else "slices"
            raise ValueError(f"images must be a tensor [B, {channels}, H, W] of {what}; got {shape}")
        if images.shape[0] == 0 or min(images.shape[2:]) < 2:
            raise ValueError(f"images must hold at least one slice of at least 2×2 pixels; got {tuple(images.shape)}")
        if not torch.isfinite(images).all():
            raise ValueError("images contain NaN or infinite values")
        if not organs:
            raise ValueError("at least one organ is needed")
        if not isinstance(num_proposals, int) or num_proposals < 1:
            raise ValueError(f"num_proposals must be a positive integer; got {num_proposals!r}")
        if not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
            raise ValueError(f"steps must be an integer from 1 to {MAX_STEPS}; got {steps!r}")

    def encode_prompt(self, organs: list[str]) -> torch.Tensor:
        """Organ names → text embeddings [P, L, D] on the device."""
        return self.prompt_encoder.encode([organ_text(o) for o in organs]).to(self.device)

    def prepare_condition(self, images: torch.Tensor) -> torch.Tensor:
        """Slices of any shape → [B, C, S, S] at the model's image size, raw intensities kept."""
        return to_square(images.float(), self.model.config.image_size).to(self.device)

    def encode_scan(self, condition: torch.Tensor) -> torch.Tensor:
        """[B, C, S, S] slices → the scan encoder's features [B, C, h, w], computed once per slice."""
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            return self.model.scan_encoder.features(condition)

    def prepare_latents(self, num_proposals: int, num_slices: int, organs: list[str], seed: int) -> torch.Tensor:
        """Starting noise [N·B·P, C, h, w], ordered proposal-major, then slice, then organ; one noise map
        per (proposal, organ), repeated on every slice (with shared noise, proposal 0's for every proposal)."""
        size, channels = self.model.working_size, self.model.mask_channels
        noise = torch.stack([
            torch.stack([
                torch.randn(channels, size, size, generator=torch.Generator().manual_seed(
                    proposal_seed(seed, 0 if self.shares_noise else k, organ)))
                for organ in organs
            ])
            for k in range(num_proposals)
        ])  # [N, P, C, h, w]
        noise = noise[:, None].expand(-1, num_slices, -1, -1, -1, -1)
        return noise.reshape(-1, channels, size, size).to(self.device)

    def prepare_step_generators(self, num_proposals: int, num_slices: int, organs: list[str],
                                seed: int) -> list[torch.Generator]:
        """One generator per latent (same order as `prepare_latents`) for a stochastic sampler's per-step
        noise: the latents of one (proposal, organ) get generators in the same state, so every slice
        receives the same noise at every step, whatever the chunking.  Deterministic samplers ignore them."""
        return [torch.Generator().manual_seed(proposal_seed(seed, k, organ, "steps"))
                for k in range(num_proposals) for _ in range(num_slices) for organ in organs]

    def prepare_prior_offsets(self, num_proposals: int, num_slices: int, num_organs: int) -> torch.Tensor:
        """[N·B·P] organ-prior logit offsets (same order as `prepare_latents`); all 0 for a model without a
        prior, whose spread is 0 (and whose forward has no prior to offset)."""
        offsets = prior_offsets(num_proposals, self.spread)
        return offsets.repeat_interleave(num_slices * num_organs).to(self.device)

    def denoise(
        self,
        latents: torch.Tensor,
        text: torch.Tensor,
        features: torch.Tensor,
        organ_index: torch.Tensor,
        steps: int,
        generators: list[torch.Generator],
        offsets: torch.Tensor,
        num_proposals: int,
    ) -> torch.Tensor:
        scheduler = make_sampler(self.scheduler_name, self.model.scheduler_config)
        scheduler.set_timesteps(steps, device=self.device)
        latents = latents * scheduler.init_noise_sigma
        for i, t in enumerate(tqdm(scheduler.timesteps, desc="denoising", disable=not self.show_progress, leave=False)):
            model_input = scheduler.scale_model_input(latents, t)
            timesteps = t.expand(latents.shape[0]).to(self.device)
            with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
                if i == 0 and self.shares_noise:  # every proposal's input is the same: one pass for all
                    prediction = self.predict_once_for_all_proposals(model_input, timesteps, text, features,
                                                                     organ_index, offsets, num_proposals)
                else:
                    prediction = self.model(model_input, timesteps, text, None, organ_index, features=features,
                                            prior_offset=offsets)
            latents = scheduler.step(prediction.float(), t, latents, generator=generators).prev_sample
        return latents

    def predict_once_for_all_proposals(self, model_input: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor,
                                       features: torch.Tensor, organ_index: torch.Tensor, offsets: torch.Tensor,
                                       num_proposals: int) -> torch.Tensor:
        """The model's prediction for inputs that repeat proposal 0's (batch order: proposal, slice, organ):
        the network runs on proposal 0's items, each proposal adds the organ prior at its own offset."""
        m = model_input.shape[0] // num_proposals
        shared, logits = self.model.steered_prediction(model_input[:m], timesteps[:m], text[:m], features[:m])
        prior = self.model.organ_prior(logits, organ_index[:m])
        return self.model.add_organ_prior(shared.repeat(num_proposals, 1, 1, 1), prior.repeat(num_proposals, 1, 1, 1),
                                          offsets)

    def prepare_full_size_prior(self, features: torch.Tensor, organs: list[str], num_proposals: int,
                                offsets: torch.Tensor) -> torch.Tensor | None:
        """[N·B·P, 1, S, S]: each latent's full-size organ read-out (logits, its proposal's offset included), which
        `decode` needs to keep the read-out's boundary; None for a model whose read-out is at the mask's size.
        Read from the slices' features [B, C, h, w] once, before they are repeated over proposals and organs."""
        if not (self.model.uses_organ_prior and self.model.scan_encoder.full_size_readout):
            return None
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            logits = self.model.scan_encoder.organ_logits(features)
        prior = logits[:, organ_channels(organs, logits.device)].float()
        prior = prior.reshape(-1, 1, *logits.shape[-2:])  # [B·P, 1, S, S]
        return prior.repeat(num_proposals, 1, 1, 1) + offsets.view(-1, 1, 1, 1).float()

    def decode(self, latents: torch.Tensor, full_size_prior: torch.Tensor | None = None) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            return self.model.decode_mask(latents, full_size_prior).float()

    @property
    def can_screen(self) -> bool:
        """Whether `organ_presence` is meaningful: the model reads organs out of the scan (compact x0 model)."""
        return self.model.uses_organ_prior

    @torch.inference_mode()
    def encode_slices(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] slices (`volume.axial_slices`) → the scan encoder's features (what screening and sampling
        both read): a caller that samples the same slices again (another organ, another request) computes them once."""
        return self.encode_scan(self.prepare_condition(images))

    @torch.inference_mode()
    def organ_presence(self, features: torch.Tensor, organs: list[str]) -> torch.Tensor:
        """[B, P]: the scan encoder's highest probability of each organ on each slice (from `encode_slices`'
        features) — a small fraction of one sampling step, to skip slices that cannot hold the organ."""
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            logits = self.model.scan_encoder.organ_logits(features.to(self.device))
        return logits[:, organ_channels(organs, logits.device)].float().sigmoid().amax(dim=(2, 3)).cpu()

    # ---- the whole flow ------------------------------------------------------------------------
    @torch.inference_mode()
    def __call__(
        self,
        images: torch.Tensor,
        organs: list[str],
        num_proposals: int = DEFAULT_PROPOSALS,
        steps: int = DEFAULT_STEPS,
        seed: int = 0,
        features: torch.Tensor | None = None,
    ) -> ProposalOutput:
        """Sample `num_proposals` masks per slice and organ; probabilities come back at the slices' size.
        `features`: the slices' `encode_slices` computed before (else computed here)."""
        self.check_inputs(images, organs, num_proposals, steps)
        b, p, n = images.shape[0], len(organs), num_proposals

        text = self.encode_prompt(organs)  # [P, L, D]
        features = self.encode_slices(images) if features is None else features.to(self.device)  # [B, C, h, w]
        latents = self.prepare_latents(n, b, organs, seed)  # [N·B·P, C, h, w]
        generators = self.prepare_step_generators(n, b, organs, seed)
        offsets = self.prepare_prior_offsets(n, b, p)
        full_size_prior = self.prepare_full_size_prior(features, organs, n, offsets)

        # Batch order is (proposal, slice, organ): repeat text over N·B, features over organs and N.
        text = text.repeat(n * b, 1, 1)
        features = features.repeat_interleave(p, dim=0).repeat(n, 1, 1, 1)
        organ_index = organ_channels(organs, self.device).repeat(n * b)
        latents = self.denoise(latents, text, features, organ_index, steps, generators, offsets, n)

        probabilities = self.decode(latents, full_size_prior)  # [N·B·P, 1, S, S]
        probabilities = from_square(probabilities, images.shape[2], images.shape[3])
        probabilities = probabilities.reshape(n, b, p, images.shape[2], images.shape[3]).cpu()
        return ProposalOutput(probabilities=probabilities, organs=list(organs), seed=seed)
