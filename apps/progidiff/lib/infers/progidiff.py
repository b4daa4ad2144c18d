"""MONAI Label infer task: prompt → N diffusion proposals → consensus label map + proposal statistics.

Flow (MONAI Label's): parse/check the request → pre-transforms (load, RAS, model spacing) →
`run_inferer` (ProGiDiff sampling, cached per image/prompt/seed/model) → inverse transforms back to
the input's geometry → post-transforms (consensus or proposal k as the label; every proposal,
the probability and the uncertainty stored in the datastore) → MONAI Label's writer.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import logging
import os
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from fastapi import HTTPException
from monai.data import MetaTensor
from monai.transforms import Compose
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask
from monailabel.transform.writer import Writer

from lib.datastore import ACCEPTED_FILES, FLOAT_MAPS, check_header
from lib.dicomweb import CONTENT_DESCRIPTION, MACHINE_SERIES, SERIES_DESCRIPTION
from lib.infers.params import InferParams, bad_request, check_device, monai_label_options, parse_params
from progidiff import lora
from progidiff.intensity import PercentileNormalisation
from progidiff.io_utils import published_folders, recover_directories, recover_directory
from progidiff.labels import ORGAN_IDS
from progidiff.modality import resolve_modality
from progidiff.model import CONFIG_NAME, ProGiDiffModel
from progidiff.plausibility import volume_warnings
from progidiff.pipeline import ProGiDiffPipeline, prompt_encoder_for
from progidiff.proposals import MASK_THRESHOLD
from progidiff.outputs import (
    InputGeometryMaps,
    bytes_needed,
    input_voxels,
    maps_in_input_geometry,
    proposal_layers,
    renumber,
    stored,
)
from progidiff.volume import (
    VolumeProposals,
    loading_transforms,
    organ_statistics,
    reading_error,
    reading_transforms,
    scan_features,
    segment_volume,
)

logger = logging.getLogger(__name__)

RESULT_CACHE_SIZE = 4
FEATURE_CACHE_SIZE = 2  # images whose scan-encoder features are kept (~0.5 MB per slice): a second prompt is cheap
SEG_NRRD = ".seg.nrrd"
# Set by the app on every request: the datastore id of the request's image (None for uploads and paths).
DATASTORE_ID = "progidiff_datastore_id"
# Set by the task on every request: the model version and pipeline the whole request uses (`ServedModel`).
SERVED_MODEL = "progidiff_served_model"
PUBLISH_WAIT_TRIES = 100


@dataclass(frozen=True)
class ServedModel:
    """One published model version and its loaded pipeline. A request takes one when it starts and uses it
    throughout: a publish in the middle of a request neither mixes two versions in one answer nor files
    a new version's result under the old version's cache key."""

    version: str
    pipeline: ProGiDiffPipeline = field(repr=False)
    adapter_configs: dict[str, dict] = field(default_factory=dict, repr=False)  # name → its adapter_config.json
    unfit_adapters: dict[str, str] = field(default_factory=dict, repr=False)  # name → why it was not loaded

    def normalisation(self, adapter: str | None) -> PercentileNormalisation | None:
        """How a study is rescaled before `adapter` reads it: what the adapter was trained with (none for the
        bare CT model, which reads Hounsfield units)."""
        return PercentileNormalisation.from_dict(self.adapter_configs.get(adapter, {}).get("intensity"))

    def __deepcopy__(self, memo: dict) -> "ServedModel":
        return self  # shared and never changed: MONAI Label deep-copies each request, not the model in it

    @property
    def short_version(self) -> str:
        """A short name of the weights (and adapters), for people: changes with every publish."""
        return hashlib.sha256(self.version.encode()).hexdigest()[:8]

    def known_organs(self) -> tuple[str, ...]:
        organs = self.pipeline.model.config.organs
        return tuple(organs) if organs else tuple(ORGAN_IDS)


ACCEPTED_IMAGES = f"{ACCEPTED_FILES}, or a folder holding one DICOM series"


def unreadable_image(error: Exception) -> Exception:
    """What a failure to read the image is: the file's fault (400, saying what is accepted) unless the server ran
    out of memory (503: try later or smaller) or lacks a reader package (its own fault: raised as is, a 500)."""
    cause = reading_error(error)
    if isinstance(cause, MemoryError):
        logger.error("out of memory while reading an image")
        return HTTPException(503, "the server ran out of memory while reading the image; try again later, or send a "
                                  "smaller image (max_memory_gb bounds what it accepts)")
    if isinstance(cause, ImportError):
        return cause
    return bad_request(f"could not read the image ({type(cause).__name__}: {str(cause)[:400]}); accepted: "
                       f"{ACCEPTED_IMAGES}")


def check_loaded_image(image: MetaTensor) -> None:
    """What resampling needs (400 otherwise): one channel, three axes of at least 2 voxels, an affine that is
    finite and invertible, finite voxels."""
    if image.ndim != 4 or image.shape[0] != 1 or min(image.shape[1:]) < 2:
        raise bad_request(f"a single-channel 3D image is needed; got array shape {tuple(image.shape)}; accepted: "
                          f"{ACCEPTED_IMAGES}")
    affine = np.asarray(image.affine, dtype=float)[:3, :3]
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine)) < 1e-6:
        raise bad_request("the image's voxel-to-world matrix (affine) is not finite and invertible; accepted: an "
                          "image whose header gives positive voxel spacings and independent axis directions")
    if not torch.isfinite(image).all():
        raise bad_request("the image holds NaN or infinite voxels; accepted: finite intensities (HU for CT)")


class ProGiDiffInfer(BasicInferTask):
    def __init__(
        self,
        model_dir: str | Path,
        settings: Any,
        datastore: Callable[[], Datastore] | None = None,
        description: str = "Text-prompted organ segmentation with several diffusion proposals (ProGiDiff)",
    ):
        super().__init__(
            path=str(model_dir),
            network=None,
            type=InferType.SEGMENTATION,
            labels=dict(ORGAN_IDS),
            dimension=3,
            description=description,
            # Not "image": MONAI's Spacingd updates every "image_*" key, and MONAI Label adds "image_path" (a str).
            input_key="volume",
            config={
                "prompt": "liver",
                "num_proposals": settings.num_proposals,
                "steps": settings.steps,
                "seed": 0,
                "proposal": -1,
                "modality": "auto",
                "proposal_layers": False,
            },
        )
        self.model_dir = Path(model_dir)
        self.settings = settings
        self.datastore = datastore
        # MONAI Label lists every device here and loads a network per requested one; this app keeps one model copy
        # on conf `device`, so it lists that one (and `check_device` refuses another).
        self._config["device"] = [str(settings.torch_device())]
        self.adapters_dir = Path(settings.adapters_path)
        self._lock = threading.Lock()
        self._sampling_lock = threading.Lock()
        self._served: ServedModel | None = None
        self._results: OrderedDict[tuple, VolumeProposals] = OrderedDict()
        self._features: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        # A publish killed between its two renames (server killed mid-publish) left the previous version aside:
        # put it back now, at start-up, before any request looks for it.
        recover_directory(self.model_dir)
        recover_directories(self.adapters_dir)

    # ---- model ---------------------------------------------------------------------------------
    def is_valid(self) -> bool:
        return (self.model_dir / CONFIG_NAME).is_file()

    def model_version(self) -> str:
        """Changes whenever a new model folder or adapter is published (folders are replaced, not edited).

        A publish swaps folders with two renames; between them, for microseconds, there is no folder:
        wait for the new one rather than fail the request.
        """
        for _ in range(PUBLISH_WAIT_TRIES):
            try:
                model = os.stat(self.model_dir / CONFIG_NAME).st_mtime_ns
                break
            except FileNotFoundError:
                time.sleep(0.05)
        else:
            model = os.stat(self.model_dir / CONFIG_NAME).st_mtime_ns
        adapters = []
        for folder in published_folders(self.adapters_dir, lora.ADAPTER_CONFIG):
            with contextlib.suppress(FileNotFoundError):  # being replaced right now: the next request sees it
                adapters.append(f"{folder.name}:{(folder / lora.ADAPTER_CONFIG).stat().st_mtime_ns}")
        return ";".join([f"model:{model}", *adapters])

    def served(self) -> ServedModel:
        """The newest published model, loaded (reloaded when a newer one has been published: no server restart)."""
        with self._lock:
            version = self.model_version()
            if self._served is None or self._served.version != version:
                logger.info("loading ProGiDiff model from %s", self.model_dir)
                self._served = self._load_pipeline()
                self._results.clear()
                self._features.clear()
            return self._served

    def _load_pipeline(self) -> ServedModel:
        """The pipeline with every published adapter loaded beside the model (inactive until asked for);
        reads again if a publish replaced a folder while it was being read."""
        failures = 0
        while True:
            version = self.model_version()
            try:
                model = ProGiDiffModel.from_pretrained(self.model_dir)
                adapter_configs, unfit = self._load_adapters(model)
                pipeline = ProGiDiffPipeline(
                    model,
                    prompt_encoder_for(model, self.model_dir),
                    scheduler=self.settings.scheduler,
                    device=self.settings.torch_device(),
                    precision=self.settings.precision,
                    show_progress=False,
                    spread=self.settings.pipeline_spread(),
                    proposal_noise=self.settings.proposal_noise,
                )
                return ServedModel(version, pipeline, adapter_configs, unfit)
            except OSError:
                failures += 1
                if failures == 3:
                    raise

    def _load_adapters(self, model: ProGiDiffModel) -> tuple[dict[str, dict], dict[str, str]]:
        """Every published adapter onto `model`: (name → its config, name → why it does not fit). One trained
        on another model (after the model was replaced) is left out and named, so that the rest is served."""
        configs, unfit = {}, {}
        for folder in published_folders(self.adapters_dir, lora.ADAPTER_CONFIG):
            try:
                configs[folder.name] = lora.load_adapter(model, folder, folder.name)
                logger.info("loaded the %s adapter from %s", folder.name, folder)
            except ValueError as error:
                unfit[folder.name] = str(error)
                logger.error("not using the %s adapter: %s", folder.name, error)
        return configs, unfit

    def known_organs(self) -> tuple[str, ...]:
        return self.served().known_organs()

    def output_signature(self, request: dict) -> dict:
        """What the stored outputs of `request` would say they were made with (batch inference skips an image
        whose outputs say the same); the request's options checked as an infer checks them (HTTP 400)."""
        served = self.served()
        return self.signature(self.checked_params(request, served), served)

    def checked_params(self, request: dict, served: ServedModel) -> InferParams:
        """The request's options over the task's defaults, checked (HTTP 400 saying what is accepted)."""
        merged = {**copy.deepcopy(self._config), **request}
        return parse_params(merged, self._config, self.settings.max_proposals, served.known_organs(), ORGAN_IDS)

    @staticmethod
    def signature(params: InferParams, served: ServedModel) -> dict:
        return {"organs": list(params.organs), "seed": params.seed, "steps": params.steps,
                "num_proposals": params.num_proposals, "model_version": served.version}

    # ---- MONAI Label flow ----------------------------------------------------------------------
    def __call__(self, request, callbacks=None):
        # Check the request before loading anything, and answer 400 with what is accepted.
        check_device(request, self.settings.torch_device())
        served = self.served()
        request = {**request, **monai_label_options({**self._config, **request}), SERVED_MODEL: served}
        params = self.checked_params(request, served)
        if isinstance(request.get("image"), str):  # a path by now: refuse from its header, before reading it
            check_header(request["image"], self.settings.max_memory_gb * 2**30, "image")
        request = {**request, "volume": request.get("image"), "progidiff": params}
        if params.proposal_layers:  # one segment per layer: only .seg.nrrd holds them (3D Slicer loads it as is)
            request["result_extension"] = SEG_NRRD
        label_file, result = super().__call__(request, callbacks)
        result["label_names"] = result.pop("progidiff_label_names", result.get("label_names"))
        stages = result.pop("progidiff_stages", {})
        result["latencies"] = {**result.get("latencies", {}), **stages}
        logger.info("stages (s): %s; total %s s", ", ".join(f"{k} {v}" for k, v in stages.items()),
                    result["latencies"].get("total"))
        return label_file, result

    def pre_transforms(self, data=None):
        spacing = data[SERVED_MODEL].pipeline.model.config.spacing_mm
        return loading_transforms(self.input_key, spacing)

    def run_pre_transforms(self, data: dict[str, Any], transforms):
        """Reading, then a check of what was read, then resampling: a 400 when the file is at fault (it cannot be
        read, is no single 3D volume, has no sound geometry or finite voxels); anything that fails after that
        check is the server's fault and is left to be a 5xx, logged with its traceback."""
        data["progidiff_pre_transforms"] = transforms  # `finish` undoes them on the outputs, a few channels at a time
        reading = len(reading_transforms(self.input_key))
        start = time.perf_counter()
        try:
            data = super().run_pre_transforms(data, transforms[:reading])
        except Exception as error:  # noqa: BLE001 - sorted by `unreadable_image`
            raise unreadable_image(error) from None
        check_loaded_image(data[self.input_key])
        loaded = time.perf_counter()
        data = super().run_pre_transforms(data, transforms[reading:])
        data["progidiff_stages"] = {"load": loaded - start, "resample": time.perf_counter() - loaded}
        return data

    def inverse_transforms(self, data=None):
        return None  # `finish` brings the outputs back to the input's geometry itself, in bounded memory

    def post_transforms(self, data=None):
        return [self.finish]

    def run_inferer(self, data: dict[str, Any], convert_to_batch: bool = True, device: str = "cpu"):
        params: InferParams = data["progidiff"]
        image = data[self.input_key]
        self._check_memory(image, params)
        modality, adapter = self.choose_adapter(data[SERVED_MODEL], params.modality, data.get("image_path", ""),
                                                image[0].numpy())
        proposals = self._proposals(data, params, adapter)
        data["progidiff_proposals"] = proposals
        voxel_ml = float(torch.as_tensor(image.pixdim[:3]).prod()) / 1000.0
        data["progidiff_stats"] = organ_statistics(proposals, voxel_ml)
        data["progidiff_seconds"] = proposals.seconds
        cached = data["progidiff_cached"]
        data["progidiff_stages"].update(encode=0.0 if cached else proposals.encode_seconds,
                                        sample=0.0 if cached else proposals.seconds - proposals.encode_seconds)
        data["progidiff_modality"] = modality
        data["progidiff_adapter"] = adapter
        return data

    @staticmethod
    def choose_adapter(served: ServedModel, requested: str, image_path: str,
                       volume: np.ndarray) -> tuple[tuple[str, str], str | None]:
        """The one rule for which weights a study gets (infer and scoring alike): its modality (the request's,
        else the DICOM tag, else the intensity rule) and the adapter published for it (None: the bare model)."""
        modality = resolve_modality(requested, image_path, volume)
        adapter = modality[0].lower()
        return modality, adapter if adapter in lora.adapter_names(served.pipeline.model) else None

    def _check_memory(self, image: MetaTensor, params: InferParams) -> None:
        """Refuse, before sampling, a request whose outputs would not fit in `max_memory_gb`.

        What it holds at once: the proposals in the model's frame (float16, N × P channels) and, while they
        are brought back to the input's geometry a few channels at a time, what `bytes_needed` counts.
        """
        n, p = params.num_proposals, len(params.organs)
        model_voxels = int(np.prod(image.shape[1:]))
        voxels = input_voxels(image)
        needed = n * p * model_voxels * 2 + bytes_needed(n, p, voxels)
        if params.proposal_layers:
            needed += p * (n + 1) * voxels  # one uint8 layer per organ and proposal, plus its consensus
        limit = self.settings.max_memory_gb * 2**30
        if needed > limit:
            raise bad_request(
                f"this request needs about {needed / 2**30:.1f} GiB ({n} proposals × {p} organs on an image of "
                f"{voxels / 1e6:.0f} M voxels) and the server's limit is max_memory_gb={self.settings.max_memory_gb:g}; "
                "ask for fewer organs or proposals, or crop the image"
            )

    def sample(self, served: ServedModel, volume: torch.Tensor, organs: list[str], num_proposals: int, steps: int,
               seed: int, adapter: str | None = None, image_key: tuple | None = None) -> VolumeProposals:
        """N proposals per organ for a volume in the model's frame, with `adapter` (None: the bare model).
        `image_key` names the volume (file and its modification time): its scan-encoder features are then
        kept for the next request on it.  The volume is rescaled first if the adapter says so (MR)."""
        pipeline = served.pipeline
        normalisation = served.normalisation(adapter)
        if normalisation is not None:
            volume = normalisation(volume)
        with self._sampling_lock:  # the active adapter belongs to the shared model: one request samples at a time
            lora.activate(pipeline.model, adapter)
            key = (*image_key, tuple(volume.shape), adapter, served.version) if image_key else None
            features, encoding = self._features.get(key) if key else None, 0.0
            if key and features is None:
                start = time.perf_counter()
                features = scan_features(pipeline, volume)
                encoding = time.perf_counter() - start
                self._features[key] = features
                while len(self._features) > FEATURE_CACHE_SIZE:
                    self._features.popitem(last=False)
            elif key:
                self._features.move_to_end(key)
            proposals = segment_volume(pipeline, volume, organs, num_proposals, steps, seed,
                                       slice_batch=self.settings.slice_batch,
                                       screen_threshold=self.settings.screen_threshold, features=features)
        if features is None:
            return proposals  # segment_volume encoded the slices itself and counted it
        return dataclasses.replace(proposals, seconds=proposals.seconds + encoding, encode_seconds=encoding)

    def _proposals(self, data: dict, params: InferParams, adapter: str | None) -> VolumeProposals:
        """Sample with `adapter` (None: the bare model), or reuse the proposals of an identical earlier request
        (e.g. asking for proposal k next)."""
        path = str(data.get("image_path", ""))
        stamp = os.stat(path).st_mtime_ns if path and os.path.exists(path) else None
        served: ServedModel = data[SERVED_MODEL]
        key = (path, stamp, params.organs, params.num_proposals, params.steps, params.seed, adapter, served.version)
        with self._lock:
            cached = self._results.get(key) if stamp is not None else None
        data["progidiff_cached"] = cached is not None
        if cached is not None:
            return cached
        proposals = self.sample(served, data[self.input_key][0], list(params.organs), params.num_proposals,
                                params.steps, params.seed, adapter, image_key=(path, stamp) if stamp else None)
        if stamp is not None:
            with self._lock:
                self._results[key] = proposals
                while len(self._results) > RESULT_CACHE_SIZE:
                    self._results.popitem(last=False)
        return proposals

    # ---- outputs -------------------------------------------------------------------------------
    def finish(self, data: dict[str, Any]) -> dict[str, Any]:
        """Consensus (or proposal k) as the returned label; proposals and maps into the datastore."""
        params: InferParams = data["progidiff"]
        organs, n = list(params.organs), params.num_proposals
        proposals: VolumeProposals = data.pop("progidiff_proposals")
        start = time.perf_counter()
        maps = maps_in_input_geometry(proposals, data[self.input_key],
                                      Compose(data.pop("progidiff_pre_transforms")), self.input_key)
        chosen = maps.proposals[params.proposal] if params.proposal is not None else maps.consensus
        values = params.values(ORGAN_IDS)
        back = time.perf_counter()
        stored = self._store_outputs(data, maps)
        stages = data["progidiff_stages"]
        stages.update(to_input_geometry=back - start, store=time.perf_counter() - back)
        if params.proposal_layers:
            pred, data["progidiff_segments"], data["color_map"] = proposal_layers(maps, organs)
        else:
            pred = renumber(chosen, values)
        # the writer takes the affine from here
        data["pred"] = MetaTensor(torch.from_numpy(pred), affine=torch.as_tensor(maps.affine))
        if not data.get("result_extension"):
            data["result_extension"] = ".nii.gz"
        data["result"] = {
            "prompt": params.prompt,
            "organs": organs,
            "returned": "consensus" if params.proposal is None else f"proposal_{params.proposal}",
            "num_proposals": n,
            "steps": params.steps,
            "seed": params.seed,
            "proposal_spread": proposals.spread,
            "modality": data["progidiff_modality"][0],
            "modality_source": data["progidiff_modality"][1],
            "adapter": data.get("progidiff_adapter"),
            "cached": data.get("progidiff_cached", False),
            "sampling_seconds": round(float(data.get("progidiff_seconds", 0.0)), 3),
            "organ_stats": data.get("progidiff_stats", {}),
            "stored_tags": stored,
            "label_values": params.label_values,
            "progidiff_label_names": values,
            "progidiff_stages": {k: round(v, 4) for k, v in stages.items()},
        }
        if params.proposal_layers:
            data["result"]["segments"] = data["progidiff_segments"]
        data["result"]["warnings"] = self.warnings(data["progidiff_modality"][0], data.get("progidiff_adapter"),
                                                   data.get("progidiff_stats", {}), data[SERVED_MODEL].unfit_adapters)
        return data

    def warnings(self, modality: str, adapter: str | None, stats: dict[str, dict],
                 unfit_adapters: dict[str, str] | None = None) -> list[str]:
        """What the user should know before trusting the masks (also logged): a modality the model is not adapted
        to (no adapter, or one trained on another model), an organ volume implausible for an adult
        (`progidiff.plausibility`)."""
        warnings = []
        if modality != "CT" and adapter is None:
            unfit = (unfit_adapters or {}).get(modality.lower())
            published = (f"the published {modality} adapter does not fit it ({unfit})" if unfit else
                         f"no {modality} adapter is published ({self.adapters_dir / modality.lower()})")
            warnings.append(
                f"this study is {modality} but the served model is trained on CT and {published}: do not trust its "
                f"masks. To adapt it, save 'final' labels of a few {modality} studies and "
                f"POST /train/progidiff_{modality.lower()}_lora")
        warnings += volume_warnings({o: s["consensus_volume_ml"] for o, s in stats.items()},
                                    {o: s["reaches_scan_end"] for o, s in stats.items()})
        for warning in warnings:
            logger.warning(warning)
        return warnings

    def writer(self, data: dict[str, Any], extension=None, dtype=None):
        """MONAI Label's writer; proposal layers keep their segment names (its default puts the model's labels)."""
        segments = data.get("progidiff_segments")
        if segments is None:
            return super().writer(data, extension, dtype)
        data["labels"] = segments
        return Writer(label=self.output_label_key, json=self.output_json_key)(data)

    def _store_outputs(self, data: dict[str, Any], maps: InputGeometryMaps) -> list[str]:
        image_id = data.get(DATASTORE_ID)
        if image_id is None or self.datastore is None:
            return []
        params: InferParams = data["progidiff"]
        n = len(maps.proposals)
        # What a PACS shows of each (DICOMweb datastores send these as DICOM-SEG; 64 characters are kept). A
        # cached answer was sent with its first request: PACS series are not replaced, so it is not sent again.
        pacs = not data.get("progidiff_cached", False)
        about = f"seed {params.seed} | model {data[SERVED_MODEL].short_version} | {', '.join(params.organs)}"
        order = f"proposals run from 1, the tightest, to {n}, the most generous"
        outputs = {"consensus": (maps.consensus, {SERIES_DESCRIPTION: f"{MACHINE_SERIES}consensus of {n} | {about}",
                                                  CONTENT_DESCRIPTION: f"mean of {n} proposals at least {MASK_THRESHOLD:g}"})}
        for k, proposal in enumerate(maps.proposals):
            outputs[f"proposal_{k}"] = (proposal, {SERIES_DESCRIPTION: f"{MACHINE_SERIES}proposal {k + 1} of {n} | {about}",
                                                   CONTENT_DESCRIPTION: order})
        outputs.update(zip(FLOAT_MAPS, ((maps.probability, {}), (maps.uncertainty, {}))))
        info = {"prompt": params.prompt, **self.signature(params, data[SERVED_MODEL]),
                "label_names": {o: ORGAN_IDS[o] for o in params.organs}}
        datastore = self.datastore()
        with tempfile.TemporaryDirectory() as tmp:
            for tag, (array, described) in outputs.items():
                path = os.path.join(tmp, f"{image_id}.nii.gz")
                nib.save(nib.Nifti1Image(stored(array), maps.affine), path)
                datastore.save_label(image_id, path, tag, {**info, "tag": tag, **(described if pacs else {})})
        return list(outputs)

