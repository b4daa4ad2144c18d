"""MONAI Label's batch inference (`POST /batch/infer/progidiff`) over the datastore, resumable and CPU-safe.

Each image is inferred as a single request would be (consensus, proposals and maps stored under their tags;
the returned label saved as `label_tag`, by default `original`), with the infer options of the request
(`prompt`, `num_proposals`, `steps`, `seed`, ...). Resumable: an image whose stored consensus was made by the
same model version with the same organs, seed, steps and number of proposals is skipped (`"force": true`
redoes it), so a run that was stopped or killed picks up where it was. The saved label keeps each organ's
schema value (`label_values` "model"): a batch has no viewer to renumber for. MONAI Label's task spreads
images over GPUs (`multi_gpu`, `gpus`; on a machine without one it would divide by zero choosing a device);
this app keeps one model copy, on the server's device (conf `device`), so a batch runs there.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.batch_infer import BatchInferTask
from monailabel.utils.others.generic import strtobool

logger = logging.getLogger(__name__)

DONE_TAG = "consensus"  # the stored output whose info says with what an image was inferred


class ProGiDiffBatchInfer(BatchInferTask):
    def __init__(self, infer: Any):
        super().__init__()
        self.infer = infer

    def __call__(self, request: dict, datastore: Datastore, infer: Callable) -> dict:
        request = {"label_values": "model", **request}
        request.update(multi_gpu=False, device=str(self.infer.settings.torch_device()))
        every = sorted(super().get_images(request, datastore))
        results = super().__call__(request, datastore, infer)
        skipped = [i for i in every if i not in results]
        logger.info("batch inference: %d images inferred, %d already done and skipped", len(results), len(skipped))
        return {**results, **{i: {"skipped": "already inferred with this model and these options"} for i in skipped}}

    def get_images(self, request: dict, datastore: Datastore) -> list[str]:
        images = super().get_images(request, datastore)
        if strtobool(request.get("force", False)):
            return images
        wanted = self.infer.output_signature(request)
        return [i for i in images if not self._done(datastore, i, wanted)]

    @staticmethod
    def _done(datastore: Datastore, image_id: str, wanted: dict) -> bool:
        info = datastore.get_label_info(image_id, DONE_TAG) or {}
        return all(info.get(key) == value for key, value in wanted.items())
