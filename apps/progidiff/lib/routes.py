"""Serve MONAI Label's heavy endpoints off the server's event loop, so the server stays responsive.

MONAI Label 0.8.5 declares every endpoint `async def` and runs its work inline: while one request samples
proposals (tens of seconds on a CPU) or scores images for active learning, the event loop is blocked and
even `/info` waits (its `MONAI_LABEL_INFER_CONCURRENCY` pool does not help: the endpoint blocks on the
pool's result). The same endpoints declared as plain `def` run in FastAPI's thread pool instead. Each one
here calls MONAI Label's own endpoint function, with the same parameters and the same permissions, and
is put in front of MONAI Label's route for the same path (batch inference's too: its `run_sync` would run
every image on the event loop). Sampling itself stays one request at a time
(the infer task's lock); `/info`, `/datastore` and the viewers' polling answer meanwhile.

Two checks come first on an infer: `params` must be a JSON object (MONAI Label answers a bare 500 otherwise),
and an image uploaded with the request is saved here and registered in `UPLOADS`, so that the app accepts
that one temporary file as the request's image, not any file of the temporary folder.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from typing import Optional

from fastapi import APIRouter, BackgroundTasks, Depends, FastAPI, File, Form, HTTPException, UploadFile
from monailabel.config import settings
from monailabel.endpoints import activelearning, batch_infer, datastore, infer, scoring, train
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.tasks.batch_infer import BatchInferImageType
from monailabel.interfaces.utils.app import app_instance

router = APIRouter()
UPLOADS: set[str] = set()  # real paths of the images uploaded with the infer requests being served now


def check_params(params: str) -> None:
    """`params` (the multipart field) must hold a JSON object."""
    accepted = 'a JSON object of options, e.g. {"prompt": "liver", "num_proposals": 5}'
    try:
        value = json.loads(params) if params else {}
    except (ValueError, RecursionError):
        raise HTTPException(400, f"'params' is not valid JSON; accepted: {accepted}") from None
    if not isinstance(value, dict):
        raise HTTPException(400, f"'params' is a JSON {type(value).__name__}; accepted: {accepted}")


@router.post("/infer/{model}")
def run_inference(
    background_tasks: BackgroundTasks,
    model: str,
    image: str = "",
    session_id: str = "",
    params: str = Form("{}"),
    file: UploadFile = File(None),
    label: UploadFile = File(None),
    output: Optional[infer.ResultType] = None,
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER)),
):
    check_params(params)
    app_instance().check_known("model", model)
    if file is None:
        return infer.run_inference(background_tasks, model, image, session_id, params, None, label, output)
    suffix = "".join(pathlib.Path(file.filename).suffixes) if file.filename else ".nii.gz"
    with tempfile.NamedTemporaryFile(suffix=suffix, delete=False) as upload:
        shutil.copyfileobj(file.file, upload)
    path = os.path.realpath(upload.name)
    UPLOADS.add(path)
    try:
        return infer.run_inference(background_tasks, model, path, session_id, params, None, label, output)
    finally:
        UPLOADS.discard(path)
        os.unlink(path)


@router.post("/activelearning/{strategy}")
def next_sample(strategy: str, params: Optional[dict] = None,
                user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
    app_instance().check_known("active-learning strategy", strategy)
    return activelearning.sample(strategy, params, user.username)


@router.post("/scoring/{method}")
def run_scoring(method: str, params: Optional[dict] = None, run_sync: Optional[bool] = False,
                user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR))):
    # options checked here: the task itself runs in a subprocess nobody answers from
    app_instance().check_scoring_request(method, params or {})
    return scoring.run_method(method, params, run_sync)


@router.post("/batch/infer/{model}")
def run_batch_inference(model: str, images: Optional[BatchInferImageType] = BatchInferImageType.IMAGES_ALL,
                        params: Optional[dict] = None, run_sync: Optional[bool] = False,
                        user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))):
    # options checked here: the run itself is a subprocess nobody answers from
    app_instance().check_batch_request(model, params or {})
    return batch_infer.run(model, images, params, run_sync)


@router.post("/train/{model}")
def run_training(model: str, params: Optional[dict] = None, run_sync: Optional[bool] = False,
                 enqueue: Optional[bool] = False, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))):
    # options checked here: the run itself is a subprocess nobody answers from
    app_instance().check_train_request(model, params or {})
    return train.run_model(model, params, run_sync, enqueue)


@router.put("/datastore/")
@router.put("/datastore/image")
def add_image(
    background_tasks: BackgroundTasks,
    image: Optional[str] = None,
    params: str = Form("{}"),
    file: UploadFile = File(...),
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR)),
):
    return datastore.add_image(background_tasks, image, params, file, user.username)


@router.put("/datastore/label")
def save_label(
    background_tasks: BackgroundTasks,
    image: str,
    params: str = Form("{}"),
    tag: str = DefaultLabelTag.FINAL.value,
    label: UploadFile = File(...),
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR)),
):
    return datastore.save_label(background_tasks, image, params, tag, label, user.username)


def serve_off_the_event_loop(server: FastAPI) -> None:
    """Put this module's routes in front of MONAI Label's for the same paths (Starlette takes the first match)."""
    if getattr(server.state, "progidiff_routes", False):
        return
    before = len(server.router.routes)
    server.include_router(router, prefix=settings.MONAI_LABEL_API_STR)
    added = server.router.routes[before:]
    del server.router.routes[before:]
    server.router.routes[0:0] = added
    server.state.progidiff_routes = True
