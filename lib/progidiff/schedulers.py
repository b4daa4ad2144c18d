"""Noise schedulers: DDPM to train, DDIM or DPM-Solver++ to sample, all from one diffusers config.

The training scheduler's config is saved with the model, so every sampler is built from the very
noise schedule the model was trained with.
"""

from __future__ import annotations

from typing import Any

from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

SAMPLERS: dict[str, type[SchedulerMixin]] = {
    "ddim": DDIMScheduler,
    "dpm": DPMSolverMultistepScheduler,
    "ddpm": DDPMScheduler,
}


def compact_training_scheduler() -> DDPMScheduler:
    """The compact pixel-space model predicts the clean mask (x0), which trains faster than ε on CPU."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="sample",
        clip_sample=True,
        clip_sample_range=1.0,
    )


def make_sampler(name: str, config: dict[str, Any]) -> SchedulerMixin:
    """A sampling scheduler of kind `name` ("ddim", "dpm", "ddpm") over the model's noise schedule."""
    if name not in SAMPLERS:
        raise ValueError(f"Unknown scheduler {name!r}; accepted: {', '.join(SAMPLERS)}")
    extra: dict[str, Any] = {}
    if name == "dpm":
        extra = {"algorithm_type": "dpmsolver++", "solver_order": 2}
    if name == "ddim":
        extra = {"set_alpha_to_one": True}
    return SAMPLERS[name].from_config(config, **extra)
