"""ProGiDiff network: a base `UNet2DConditionModel` steered by a ControlNet branch that sees the scan.

Two kinds of base:
- a local Stable-Diffusion-layout folder (`unet/`, `vae/`, `scheduler/`, `text_encoder/`, `tokenizer/`):
  the base stays frozen, masks are denoised in the VAE's latent space;
- "compact": a small UNet built from a fixed config, working on the mask in pixel space.  No pretrained
  compact base exists, so by default it trains together with the branch (`freeze_base=False`).

The branch is a diffusers `ControlNetModel` made from the base (`from_unet`) whose conditioning
embedding is replaced by `ScanEncoder`; its zero convolutions make an untrained branch a no-op.

A trained model is one folder: `progidiff_config.json`, `controlnet/` (config + safetensors),
`scheduler/`, and for the compact base `unet/` (the SD base is referenced by path, never copied).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from torch import nn

from .image_encoder import DEFAULT_WINDOWS, ScanEncoder
from .io_utils import atomic_directory, recover_directory
from .labels import ORGAN_IDS
from .schedulers import compact_training_scheduler

CONFIG_NAME = "progidiff_config.json"
CONTROL_WEIGHTS = "diffusion_pytorch_model.safetensors"


@dataclass
class ProGiDiffConfig:
    """Everything needed to rebuild the network (weights aside)."""

    base: str = "compact"  # "compact" or a local Stable-Diffusion-layout folder
    image_size: int = 128  # side of the square slice fed to the scan encoder
    spacing_mm: float = 3.0  # in-plane spacing slices are resampled to before they reach the model (0: keep)
    mask_size: int = 64  # compact base: side of the denoised mask (0: same as image_size)
    text_encoder: str = "minilm"  # "minilm" (packaged), "base" (the SD folder's CLIP) or a local folder
    text_max_length: int = 16
    cross_attention_dim: int = 384
    freeze_base: bool = False
    compact_channels: tuple[int, ...] = (16, 32, 64, 64)
    encoder_channels: tuple[int, ...] = (16, 32)
    encoder_backbone: tuple[int, ...] = (16, 32, 64, 128)  # MONAI UNet channels before the encoder stages
    windows: tuple[tuple[float, float], ...] = DEFAULT_WINDOWS
    organs: list[str] = field(default_factory=list)  # organs the model was trained on (empty: untrained)
    organ_prior: bool = True  # compact x0 model: add the scan encoder's organ read-out to the predicted mask
    full_size_readout: bool = False  # organ read-out at image_size, its detail kept in the mask (decode_mask)
    context_slices: int = 0  # 2.5D: neighbouring axial slices each side fed with the slice (volume.axial_slices)
    boundary_jitter: float = 0.0  # px at image_size: proposals' boundaries spread over ± this (see training)
    proposal_spread: float = 4.0  # organ-prior logits: proposals span −this…+this (prior_offsets; model/README.md)

    @property
    def is_latent(self) -> bool:
        return self.base != "compact"

    @property
    def input_slices(self) -> int:
        """Axial slices per model input: the slice itself and `context_slices` neighbours each side."""
        return 1 + 2 * self.context_slices

    @property
    def compact_mask_size(self) -> int:
        return self.mask_size or self.image_size

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def load(cls, directory: str | Path) -> "ProGiDiffConfig":
        """The config of a saved model folder (its `progidiff_config.json`), without its weights."""
        config_path = Path(directory) / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"{directory} is not a ProGiDiff model folder (no {CONFIG_NAME})")
        return cls.from_json(json.loads(config_path.read_text()))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ProGiDiffConfig":
        known = {f for f in cls.__dataclass_fields__}
        data = {k: v for k, v in data.items() if k in known}
        for key in ("compact_channels", "encoder_channels", "encoder_backbone"):
            if key in data:
                data[key] = tuple(data[key])
        if "windows" in data:
            data["windows"] = tuple(tuple(w) for w in data["windows"])
        return cls(**data)


def prior_offsets(num_proposals: int, spread: float) -> torch.Tensor:
    """Per proposal, the logit added to the organ prior: evenly from −spread to +spread, tightest first.

    One reference mask per training slice teaches the diffusion model a single answer: sampled from
    different noise alone, its proposals barely differ (model/README.md).  Where the model is sure, its
    prior's logit is steep at the organ's edge and an offset hardly moves the boundary; where it is unsure
    (a faint edge, partial volume) the logit is shallow and the boundary moves far.  So proposals that
    sample the prior at different confidence levels differ where an expert has to decide, and agree
    elsewhere.  Proposal k of N gets spread · (−1 + (2k + 1) / N): one proposal (N = 1) is the model's
    plain answer, and the offsets are symmetric so the consensus stays centred on it.
    """
    k = torch.arange(num_proposals, dtype=torch.float32)
    return spread * (-1.0 + (2.0 * k + 1.0) / num_proposals)


def compact_unet(config: ProGiDiffConfig) -> UNet2DConditionModel:
    """A small pixel-space UNet: cross-attention only at the lowest resolution (and the mid block).

    Self-attention over a 32×32 map alone costs more than all convolutions on 2 CPU cores.  So that the
    prompt still reaches every resolution, an attention-pooled text embedding joins the timestep
    embedding (`addition_embed_type="text"`) and modulates every ResNet block by scale and shift.
    """
    channels = tuple(config.compact_channels)
    levels = len(channels)
    down = ("DownBlock2D",) * (levels - 1) + ("CrossAttnDownBlock2D",)
    up = ("CrossAttnUpBlock2D",) + ("UpBlock2D",) * (levels - 1)
    return UNet2DConditionModel(
        sample_size=config.compact_mask_size,
        in_channels=1,
        out_channels=1,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=channels,
        layers_per_block=1,
        cross_attention_dim=config.cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
        addition_embed_type="text",
        addition_embed_type_num_heads=8,
        resnet_time_scale_shift="scale_shift",
    )


class ProGiDiffModel(nn.Module):
    """Base UNet + scan-conditioned ControlNet branch (+ VAE for latent bases)."""

    def __init__(
        self,
        config: ProGiDiffConfig,
        unet: UNet2DConditionModel,
        controlnet: ControlNetModel,
        scheduler_config: dict[str, Any],
        vae: AutoencoderKL | None = None,
    ):
        super().__init__()
        self.config = config
        self.unet = unet
        self.controlnet = controlnet
        self.vae = vae
        self.scheduler_config = dict(scheduler_config)
        self.unet.requires_grad_(not config.freeze_base)
        if self.vae is not None:
            self.vae.requires_grad_(False)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: ProGiDiffConfig) -> "ProGiDiffModel":
        """A new model: base loaded (SD folder) or built (compact), branch freshly made from it."""
        vae = None
        if config.is_latent:
            base = Path(config.base)
            _check_sd_layout(base)
            unet = UNet2DConditionModel.from_pretrained(base / "unet")
            vae = AutoencoderKL.from_pretrained(base / "vae")
            scheduler_config = DDPMScheduler.from_pretrained(base / "scheduler").config
            config.cross_attention_dim = unet.config.cross_attention_dim
            config.freeze_base = True  # a pretrained base is never trained, only steered
            if config.text_encoder == "minilm" and (base / "text_encoder").is_dir():
                # The base's cross-attention was trained on its own CLIP, at CLIP's usual 77 tokens.
                config.text_encoder, config.text_max_length = "base", 77
        else:
            unet = compact_unet(config)
            scheduler_config = compact_training_scheduler().config
        controlnet = ControlNetModel.from_unet(unet, conditioning_channels=1)
        controlnet.controlnet_cond_embedding = cls._scan_encoder(config, unet, vae)
        return cls(config, unet, controlnet, scheduler_config, vae)

    @staticmethod
    def _scan_encoder(config: ProGiDiffConfig, unet: UNet2DConditionModel, vae: AutoencoderKL | None) -> ScanEncoder:
        if vae is not None:
            factor = 2 ** (len(vae.config.block_out_channels) - 1)
        else:
            factor = config.image_size // config.compact_mask_size
        if factor < 1 or 2 ** int(math.log2(factor)) != factor:
            raise ValueError(f"image_size / working size must be a power of two; got {factor}")
        return ScanEncoder(
            out_channels=unet.config.block_out_channels[0],
            downsample=int(math.log2(factor)),
            channels=config.encoder_channels,
            windows=config.windows,
            num_organs=len(ORGAN_IDS),
            backbone_channels=config.encoder_backbone,
            full_size_readout=config.full_size_readout and vae is None,  # a latent base has no organ prior to refine
            in_channels=config.input_slices,
        )

    # ---- the network ---------------------------------------------------------------------------
    @property
    def scan_encoder(self) -> ScanEncoder:
        return self.controlnet.controlnet_cond_embedding

    @property
    def uses_organ_prior(self) -> bool:
        """Only where the UNet predicts the mask itself (compact base, x0) can the read-out be added to it."""
        return self.config.organ_prior and self.vae is None and self.scheduler_config["prediction_type"] == "sample"

    @property
    def mask_channels(self) -> int:
        return self.unet.config.in_channels

    @property
    def working_size(self) -> int:
        """Side of the denoised tensor: the image size, or the latent size for a VAE base."""
        if self.vae is None:
            return self.config.compact_mask_size
        return self.config.image_size // 2 ** (len(self.vae.config.block_out_channels) - 1)

    def forward(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        text_embeddings: torch.Tensor,
        image: torch.Tensor,
        organ_index: torch.Tensor | None = None,
        conditioning_scale: float = 1.0,
        return_organ_logits: bool = False,
        features: torch.Tensor | None = None,
        prior_offset: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The base's prediction for `noisy`, steered by the branch's residuals from `image`.

        With the organ prior, the scan encoder's read-out for the prompted organ (`organ_index`, schema
        value − 1, one per batch item) is added to the predicted mask: the diffusion model then learns
        the proposals' variation around an anatomy estimate instead of the anatomy from scratch.
        `return_organ_logits` also returns every organ's logits (for the training loss).
        `features`: `scan_encoder.features(image)` computed beforehand (a sampler reuses them for every
        step, proposal and organ of a slice); `image` is then not read.
        `prior_offset` [B]: added to the prior's logit, so a proposal's mask follows a tighter (< 0) or a
        more generous (> 0) contour of the anatomy estimate (`prior_offsets`).
        """
        if features is None:
            features = self.scan_encoder.features(image)  # once, for the branch and the organ read-out
        prediction, logits = self.steered_prediction(noisy, timesteps, text_embeddings, features, conditioning_scale)
        if self.uses_organ_prior:
            prediction = self.add_organ_prior(prediction, self.organ_prior(logits, organ_index), prior_offset)
        return (prediction, logits) if return_organ_logits else prediction

    def steered_prediction(self, noisy: torch.Tensor, timesteps: torch.Tensor, text_embeddings: torch.Tensor,
                           features: torch.Tensor, conditioning_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """The base's prediction steered by the branch, before any organ prior, and every organ's logits: what
        proposals that start from the same noise share (they differ only in the prior's offset)."""
        down, mid = self.controlnet(
            noisy,
            timesteps,
            encoder_hidden_states=text_embeddings,
            controlnet_cond=features,
            conditioning_scale=conditioning_scale,
            return_dict=False,
        )
        prediction = self.unet(
            noisy,
            timesteps,
            encoder_hidden_states=text_embeddings,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        ).sample
        return prediction, self.scan_encoder.organ_logits(features)

    @staticmethod
    def organ_prior(logits: torch.Tensor, organ_index: torch.Tensor | None) -> torch.Tensor:
        """The prompted organ's read-out [B, 1, h, w] out of every organ's logits (`organ_index` per batch item)."""
        if organ_index is None:
            raise ValueError("this model adds an organ prior: pass organ_index (schema value - 1) per batch item")
        index = organ_index.to(logits.device).view(-1, 1, 1, 1).expand(-1, 1, *logits.shape[-2:])
        return logits.gather(1, index)

    @staticmethod
    def add_organ_prior(prediction: torch.Tensor, prior: torch.Tensor,
                        prior_offset: torch.Tensor | None = None) -> torch.Tensor:
        """`prediction` plus the organ's read-out (offset per batch item), as 2·sigmoid − 1; a full-size read-out
        is averaged down to the prediction's size first."""
        if prior.shape[-2:] != prediction.shape[-2:]:
            prior = F.interpolate(prior.float(), size=prediction.shape[-2:], mode="area")
        if prior_offset is not None:
            prior = prior + prior_offset.to(prior).view(-1, 1, 1, 1)
        return prediction + torch.tanh(prior / 2).to(prediction.dtype)

    # ---- masks <-> the denoised space ----------------------------------------------------------
    def encode_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """Masks [B,1,H,W] in {0,1} → the space the UNet denoises ([-1,1] pixels or VAE latents)."""
        x = mask.float() * 2.0 - 1.0
        if self.vae is None:
            size = self.config.compact_mask_size
            return x if x.shape[-1] == size else F.interpolate(x, size=(size, size), mode="area")
        x = x.to(self.vae.dtype).repeat(1, 3, 1, 1)
        return self.vae.encode(x).latent_dist.mean * self.vae.config.scaling_factor

    def decode_mask(self, x: torch.Tensor, full_size_prior: torch.Tensor | None = None) -> torch.Tensor:
        """The denoised tensor → foreground probability [B,1,S,S] in [0,1] at the image size.

        `full_size_prior` [B,1,S,S]: the prompted organ's full-size read-out (logits, offset included) that was
        added, averaged down, to the denoised mask (`add_organ_prior`).  Its detail finer than the mask (what
        bilinear upsampling of the averaged prior misses) is added back, so the mask keeps the read-out's
        full-size boundary and the diffusion model's own contribution is upsampled as before.
        """
        if self.vae is not None:
            x = self.vae.decode(x / self.vae.config.scaling_factor).sample.mean(dim=1, keepdim=True)
        size = self.config.image_size
        x = self._upsample(x.float(), size)
        if full_size_prior is not None:
            prior = full_size_prior.float()
            averaged = F.interpolate(prior, size=self.working_size, mode="area")
            x = x + torch.tanh(prior / 2) - self._upsample(torch.tanh(averaged / 2), size)
        return ((x + 1.0) / 2.0).clamp(0.0, 1.0)

    @staticmethod
    def _upsample(x: torch.Tensor, size: int) -> torch.Tensor:
        if x.shape[-1] == size:
            return x
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)

    # ---- save / load ---------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        """Write the model folder atomically: readers see the old folder or the new one, never half."""
        with atomic_directory(directory) as tmp:
            (tmp / CONFIG_NAME).write_text(json.dumps(self.config.to_json(), indent=2))
            DDPMScheduler.from_config(self.scheduler_config).save_pretrained(tmp / "scheduler")
            self.controlnet.save_config(tmp / "controlnet")
            state = {k: v.detach().contiguous().cpu() for k, v in self.controlnet.state_dict().items()}
            save_file(state, tmp / "controlnet" / CONTROL_WEIGHTS)
            if not self.config.is_latent:
                self.unet.save_pretrained(tmp / "unet")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "ProGiDiffModel":
        directory = recover_directory(directory)  # a publish killed between its two renames left the old one aside
        config = ProGiDiffConfig.load(directory)
        vae = None
        if config.is_latent:
            base = resolve_base(config.base, directory)
            _check_sd_layout(base)
            unet = UNet2DConditionModel.from_pretrained(base / "unet")
            vae = AutoencoderKL.from_pretrained(base / "vae")
        else:
            unet = UNet2DConditionModel.from_pretrained(directory / "unet")
        scheduler_config = DDPMScheduler.from_pretrained(directory / "scheduler").config
        controlnet = ControlNetModel.from_config(ControlNetModel.load_config(directory / "controlnet"))
        controlnet.controlnet_cond_embedding = cls._scan_encoder(config, unet, vae)
        controlnet.load_state_dict(load_file(directory / "controlnet" / CONTROL_WEIGHTS))
        return cls(config, unet, controlnet, scheduler_config, vae)


def resolve_base(base: str, model_dir: Path) -> Path:
    """A base path saved relative to the model folder stays valid when both move together."""
    path = Path(base)
    return path if path.is_absolute() else (model_dir / path).resolve()


def _check_sd_layout(base: Path) -> None:
    missing = [sub for sub in ("unet", "vae", "scheduler") if not (base / sub).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"Base model folder {base} lacks {', '.join(missing)}/; expected a local Stable-Diffusion-layout "
            "diffusers folder (unet/, vae/, scheduler/, text_encoder/, tokenizer/) or base='compact'"
        )
