"""TaskConfig of the ProGiDiff model: `--conf` keys → settings, model folder, infer task."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from monailabel.interfaces.config import TaskConfig

from lib.infers.progidiff import ProGiDiffInfer
from lib.trainers.progidiff import ProGiDiffTrain
from lib.trainers.progidiff_lora import ProGiDiffLoraTrain
from progidiff.labels import ORGAN_IDS
from progidiff.model import CONFIG_NAME, ProGiDiffConfig, ProGiDiffModel
from progidiff.pipeline import (DEFAULT_PROPOSAL_NOISE, DEFAULT_PROPOSALS, DEFAULT_SCHEDULER, DEFAULT_STEPS, MAX_SPREAD,
                                PROPOSAL_NOISE, default_device)
from progidiff.schedulers import SAMPLERS
from progidiff.volume import DEFAULT_SCREEN_THRESHOLD

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "progidiff_ct"


@dataclass
class AppSettings:
    """The `--conf` keys of the app, with their defaults (documented in the README)."""

    base_model: str = "compact"
    model_path: str = ""
    num_proposals: int = DEFAULT_PROPOSALS
    max_proposals: int = 10
    steps: int = DEFAULT_STEPS
    scheduler: str = DEFAULT_SCHEDULER
    proposal_noise: str = DEFAULT_PROPOSAL_NOISE  # an organ's proposals: one noise, each its own prior offset
    proposal_spread: float = -1.0  # organ-prior logit range the proposals span (< 0: the model's own)
    device: str = "auto"
    precision: str = "auto"
    slice_batch: int = 8
    screen_threshold: float = DEFAULT_SCREEN_THRESHOLD  # sample only slices where the organ can be (0: all)
    max_memory_gb: float = 8.0  # requests whose outputs need more are refused with a message
    adapters_path: str = ""  # LoRA adapters, one folder per modality; default <model_path>/../adapters
    train_dir: str = ""  # training runs (checkpoints, TensorBoard, train stats); default <repo>/runs/app
    train_threads: int = 0  # CPU threads of a training run (0: torch's default; see ProGiDiffTrain.cpu_threads)

    @classmethod
    def from_conf(cls, conf: dict[str, str], default_model_path: Path) -> "AppSettings":
        settings = cls()
        for key, default in vars(cls()).items():
            if key in conf and conf[key] != "":
                try:
                    setattr(settings, key, type(default)(conf[key]))
                except ValueError:
                    raise ValueError(f"--conf {key} must be a {type(default).__name__}; got {conf[key]!r}") from None
        settings.model_path = settings.model_path or str(default_model_path)
        settings.adapters_path = settings.adapters_path or str(Path(settings.model_path).parent / "adapters")
        settings.train_dir = settings.train_dir or str(default_model_path.parents[1] / "runs" / "app")
        if settings.proposal_noise not in PROPOSAL_NOISE:
            raise ValueError(f"--conf proposal_noise must be one of {', '.join(PROPOSAL_NOISE)}; "
                             f"got {settings.proposal_noise!r}")
        if settings.scheduler not in SAMPLERS:
            raise ValueError(f"--conf scheduler must be one of {', '.join(SAMPLERS)}; got {settings.scheduler!r}")
        if not 1 <= settings.num_proposals <= settings.max_proposals:
            raise ValueError(f"--conf num_proposals must lie in 1..max_proposals ({settings.max_proposals})")
        if settings.train_threads < 0:
            raise ValueError(f"--conf train_threads must be 0 (torch's default) or a number of threads; "
                             f"got {settings.train_threads!r}")
        if not settings.proposal_spread <= MAX_SPREAD:
            raise ValueError(f"--conf proposal_spread must lie in 0..{MAX_SPREAD:g}, or be negative for the model's "
                             f"own; got {settings.proposal_spread!r}")
        return settings

    def pipeline_spread(self) -> float | None:
        """`proposal_spread` for the pipeline: None (the model's own) unless set."""
        return None if self.proposal_spread < 0 else self.proposal_spread

    def torch_device(self) -> torch.device:
        return default_device() if self.device == "auto" else torch.device(self.device)


class ProGiDiff(TaskConfig):
    def init(self, name: str, model_dir: str, conf: dict[str, str], planner: Any, **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        self.settings = AppSettings.from_conf(conf, Path(model_dir) / DEFAULT_MODEL_NAME)
        self.path = self.settings.model_path
        self.labels = dict(ORGAN_IDS)
        self.datastore = kwargs.get("datastore")
        self._ensure_model()

    def _ensure_model(self) -> None:
        """Serve what is there; with no model yet, create an untrained one so the server still starts (and say so)."""
        path = Path(self.path)
        if (path / CONFIG_NAME).is_file():
            return
        logger.warning(
            "No trained model at %s: creating an UNTRAINED %s model there. Its proposals are noise until it is "
            "trained (python -m progidiff.train, or POST /train).", path, self.settings.base_model,
        )
        ProGiDiffModel.from_config(ProGiDiffConfig(base=self.settings.base_model)).save_pretrained(path)

    def infer(self):
        return {self.name: ProGiDiffInfer(self.path, self.settings, datastore=self.datastore)}

    def trainer(self):
        """Two train tasks: fine-tune the served model, and a LoRA adapter for MR."""
        runs = Path(self.settings.train_dir)
        lora_name = f"{self.name}_mr_lora"
        return {
            self.name: ProGiDiffTrain(self.path, runs / self.name, self.settings),
            lora_name: ProGiDiffLoraTrain(self.path, self.settings.adapters_path, runs / lora_name, self.settings, "MR"),
        }
