"""ProGiDiff-Label: a MONAI Label app that segments organs by text prompt with several diffusion proposals.

    monailabel start_server --app apps/progidiff --studies sample-datasets/ct [--conf KEY VALUE ...]

The conf keys are listed in the README; the model folder defaults to <repo>/model/progidiff_ct.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any

from fastapi import HTTPException
from monailabel.config import settings
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

import progidiff
from lib.activelearning.proposal_disagreement import ProposalDisagreement
from lib.configs.progidiff import ProGiDiff
from lib.datastore import SafeLocalDatastore, image_id_for
from lib.dicomweb import ProGiDiffDICOMWebDatastore
from lib.infers.batch import ProGiDiffBatchInfer
from lib.infers.params import check_image_reference
from lib.infers.progidiff import DATASTORE_ID
from lib.routes import UPLOADS, serve_off_the_event_loop
from lib.scoring.proposal_uncertainty import ProposalUncertainty, ScoringParams
from progidiff.labels import ORGAN_IDS
from progidiff.logs import quiet_codec_notice

logger = logging.getLogger(__name__)
quiet_codec_notice()  # the server's processes (training and scoring too) import this module


class ProGiDiffApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, Any]):
        self.model_dir = os.path.normpath(os.path.join(app_dir, "..", "..", "model"))
        self.models = {"progidiff": ProGiDiff()}
        for name, config in self.models.items():
            config.init(name, self.model_dir, conf, None, datastore=self.datastore)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="ProGiDiff-Label",
            description="Text-prompted organ segmentation with several diffusion mask proposals per prompt",
            version=progidiff.__version__,
            labels=list(ORGAN_IDS),  # names in label-value order: OHIF's panel needs a list here
        )
        # Sampling proposals for every unlabelled image is minutes of CPU: score when asked
        # (POST /scoring/proposal_uncertainty), not after every label, sample and training, unless told to.
        self._auto_update_scoring = conf.get("auto_update_scoring", "false").lower() in ("1", "true", "yes")
        # Folders from which a request may name an image by absolute path (e.g. DICOM series folders).
        roots = [r for r in conf.get("image_roots", "").split(",") if r.strip()]
        if not self.studies.startswith(("http://", "https://")):
            roots.append(self.studies)
        # MONAI Label's sessions (an image uploaded with an infer request is allowed by `lib.routes.UPLOADS`).
        if self.sessions() is not None:
            roots.append(self.sessions().store_path)
        self.image_roots = [os.path.realpath(r.strip()) for r in roots]

    def on_init_complete(self) -> None:
        """The server is up (MONAI Label calls this from its start-up, not from train subprocesses)."""
        from monailabel.app import app as server

        serve_off_the_event_loop(server)
        super().on_init_complete()

    def infer(self, request: dict, datastore: Datastore | None = None) -> dict:
        """Refuse unknown ids and paths outside the allowed folders before MONAI Label resolves them; a viewer's
        volume name reaches the id its upload was stored under; the task learns the image's datastore id."""
        store = datastore or self.datastore()
        ids = store.list_images() if isinstance(store, LocalDatastore) else None
        image = request.get("image")
        if ids is not None and isinstance(image, str) and image not in ids and not os.path.isabs(image):
            with contextlib.suppress(HTTPException):  # not even a name a viewer gives: refused below
                mapped = image_id_for(image)
                image = mapped if mapped in ids else image
        check_image_reference(image, ids, self.image_roots, UPLOADS)
        in_datastore = ids is not None and image in ids
        return super().infer({**request, "image": image, DATASTORE_ID: image if in_datastore else None}, datastore)

    def check_known(self, kind: str, name: str) -> None:
        """Refuse (404, naming what there is) a request for a task this app does not have; cheap, unlike `info()`,
        which also lists the datastore (a PACS query in DICOMweb mode)."""
        tasks, known = {"model": (self._infers, "this server serves"),
                        "active-learning strategy": (self._strategies, "known"),
                        "scoring method": (self._scoring_methods, "known"),
                        "train task": (self._trainers, "known")}[kind]
        if name not in tasks:
            raise HTTPException(404, f"no {kind} {name!r}; {known}: {', '.join(tasks)}")

    def check_train_request(self, model: str, params: dict) -> None:
        """Refuse an unknown train task or bad options (HTTP 4xx) before MONAI Label submits the run."""
        self.check_known("train task", model)
        self._trainers[model].check_request(params)

    def check_scoring_request(self, method: str, params: dict) -> None:
        """Refuse an unknown scoring method or bad options (HTTP 4xx) before MONAI Label submits the task."""
        self.check_known("scoring method", method)
        if isinstance(self._scoring_methods[method], ProposalUncertainty):
            ScoringParams.from_request(params, self._infers["progidiff"])

    def init_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")):
            self.studies = self.studies.rstrip("/").strip()
            if settings.MONAI_LABEL_DATASTORE.lower() in ("xnat", "dsa"):
                return super().init_datastore()
            return ProGiDiffDICOMWebDatastore.from_settings(self.studies)
        return SafeLocalDatastore(
            self.studies,
            max_bytes=self.models["progidiff"].settings.max_memory_gb * 2**30,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def _download_dcmqi_tools(self) -> None:
        """MONAI Label downloads dcmqi at start-up in DICOMweb mode (and fails offline); SEG is written without it."""
        logger.info("DICOM-SEG is written with pydicom-seg: dcmqi is not needed and not downloaded")

    def init_infers(self) -> dict[str, InferTask]:
        infers: dict[str, InferTask] = {}
        for config in self.models.values():
            infers.update(config.infer())
        return infers

    def init_trainers(self) -> dict[str, TrainTask]:
        trainers: dict[str, TrainTask] = {}
        for config in self.models.values():
            trainers.update(config.trainer())
        return trainers

    def init_batch_infer(self) -> Callable:
        return ProGiDiffBatchInfer(self._infers["progidiff"])

    def check_batch_request(self, model: str, params: dict) -> None:
        """Refuse an unknown model or bad infer options (HTTP 4xx) before a batch inference starts."""
        self.check_known("model", model)
        self._infers[model].output_signature(params)

    def init_strategies(self) -> dict[str, Strategy]:
        return {
            "proposal_disagreement": ProposalDisagreement(self._infers["progidiff"]),
            "random": Random(),
            "first": First(),
        }

    def init_scoring_methods(self) -> dict[str, ScoringMethod]:
        return {"proposal_uncertainty": ProposalUncertainty(self._infers["progidiff"])}
