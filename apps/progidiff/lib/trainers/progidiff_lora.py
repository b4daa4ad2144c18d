"""MONAI Label train task: a few-shot LoRA adapter that adapts the served (CT) model to another modality.

`POST /train/progidiff_mr_lora` trains peft LoRA adapters on the control branch (optionally the base
UNet's attention too) from the labelled images of that modality in the datastore (K can be 1); the
model itself stays frozen.  The best epoch's adapter alone (adapter_config.json + safetensors, small)
is published to `<adapters_path>/<modality>/`, atomically; the infer task loads it on its next request
and uses it for studies of that modality.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import HTTPException
from monai.transforms import LoadImage
from monailabel.interfaces.datastore import Datastore
from monailabel.tasks.train.basic_train import Context
from monailabel.utils.others.generic import strtobool

from lib.trainers.progidiff import ProGiDiffTrain
from progidiff import lora
from progidiff.data import Volume, normalised
from progidiff.intensity import normalisation_for
from progidiff.modality import resolve_modality
from progidiff.model import ProGiDiffModel
from progidiff.training import DiffusionTrainer

logger = logging.getLogger(__name__)

SERVED = "served"  # name under which the published adapter is loaded to validate it before a run


class ProGiDiffLoraTrain(ProGiDiffTrain):
    bias_field = True

    def __init__(self, model_path: str | Path, adapters_path: str | Path, run_dir: str | Path, settings: Any,
                 modality: str = "MR"):
        super().__init__(
            model_path, run_dir, settings,
            publish_path=Path(adapters_path) / modality.lower(),
            # One labelled study is a few dozen slices: 20 epochs were 40 steps and left the adapter unusable
            # (bench/app_mr_training.py); 300 with 8 MR phantoms are 900 steps (≈ 21 min on 2 CPU cores).
            config={"max_epochs": 300, "learning_rate": 1e-3, "rank": 8, "alpha": 8.0, "dropout": 0.0,
                    "base_attention": False},
            description=f"Few-shot LoRA adaptation of the ProGiDiff model to {modality} (model frozen)",
        )
        self._config.pop("contrast_rate")  # moves non-contrast CT only: not an option of the MR task
        self.modality = modality
        self.lora_settings = lora.LoraSettings()
        self.normalisation = normalisation_for(modality)  # recorded in the adapter: the infer task applies it too

    def option_bounds(self) -> dict[str, tuple[type, float, float]]:
        return {**super().option_bounds(), "rank": (int, 1, 256), "alpha": (float, 0.01, 10000.0),
                "dropout": (float, 0.0, 0.9)}

    def network(self, context: Context) -> ProGiDiffModel:
        request = context.request
        self.lora_settings = lora.LoraSettings(rank=int(request["rank"]), alpha=float(request["alpha"]),
                                               dropout=float(request["dropout"]),
                                               base_attention=strtobool(request["base_attention"]))
        model = ProGiDiffModel.from_pretrained(self.model_path)
        lora.add_adapter(model, self.modality.lower(), self.lora_settings)
        return model

    def check_request(self, params: dict[str, Any]) -> None:
        super().check_request(params)
        if "base_attention" in params:
            try:
                strtobool(params["base_attention"])
            except (AttributeError, TypeError, ValueError):
                raise HTTPException(400, "train option 'base_attention' must be true or false; got "
                                         f"{params['base_attention']!r}"[:300]) from None

    def pre_process(self, request: dict, datastore: Datastore) -> list[dict]:
        """Only the labelled images of this task's modality (DICOM tag, else the intensity rule)."""
        keep = []
        for item in super().pre_process(request, datastore):
            modality, source = resolve_modality("auto", item["image"], np.asarray(LoadImage(image_only=True)(item["image"])))
            if modality == self.modality:
                keep.append(item)
            else:
                logger.info("%s is %s (by %s): not used for the %s adapter", item["id"], modality, source, self.modality)
        if not keep:
            raise ValueError(f"no labelled {self.modality} images: save a 'final' label for at least one {self.modality} study")
        return keep

    def served_validation(self, trainer: DiffusionTrainer) -> dict:
        """The adapter published for this modality (what its studies get now); with none, the bare model (the
        new adapter starts as a no-op); the bare model too when the published one was trained on another model
        (the infer task does not use it either)."""
        published = Path(self._publish_path)
        if not (published / lora.ADAPTER_CONFIG).is_file():
            return super().served_validation(trainer)
        try:
            lora.load_adapter(trainer.model, published, SERVED)
        except ValueError as error:
            logger.warning("the published adapter is not served (%s): comparing with the bare model", error)
            return super().served_validation(trainer)
        lora.activate(trainer.model, SERVED)
        try:
            return trainer.validate()
        finally:
            lora.activate(trainer.model, self.modality.lower())
            lora.remove_adapter(trainer.model, SERVED)
            for param in trainer.params:  # loading froze the model: the new adapter trains again
                param.requires_grad_(True)

    def prepared(self, volume: Volume) -> Volume:
        """Rescaled per study, as the infer task rescales this modality's studies for the adapter."""
        return normalised(volume, self.normalisation)

    def save_to(self, trainer: DiffusionTrainer, directory: str | Path) -> None:
        """Write the adapter alone (adapter_config.json + safetensors), atomically."""
        with trainer.ema_weights():
            lora.save_adapter(trainer.model, self.modality.lower(), directory, self.lora_settings,
                              extra=lora.adapter_record(self.modality, self.model_path, self.normalisation))
