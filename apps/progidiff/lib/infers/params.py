"""Infer request parameters: parsed and checked before any work, so bad input gets a clear HTTP 400."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException

from lib.datastore import SAFE_NAME
from progidiff.prompts import UnknownPromptError, parse_prompt

MAX_PROMPT_CHARS = 500
MAX_STEPS = 200
MODALITIES = ("auto", "CT", "MR")


def bad_request(message: str) -> HTTPException:
    return HTTPException(status_code=400, detail=message)


@dataclass(frozen=True)
class InferParams:
    prompt: str
    organs: tuple[str, ...]
    num_proposals: int
    steps: int
    seed: int
    proposal: int | None  # return this proposal instead of the consensus
    modality: str


def _integer(data: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = data.get(key, default)
    if value is None or value == "":
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, str, float)):
        raise bad_request(f"'{key}' must be an integer from {low} to {high}; got {value!r}")
    try:
        number = int(str(value).strip())
    except ValueError:
        raise bad_request(f"'{key}' must be an integer from {low} to {high}; got {value!r}") from None
    if not low <= number <= high:
        raise bad_request(f"'{key}' must be an integer from {low} to {high}; got {number}")
    return number


def parse_params(
    data: dict[str, Any], defaults: dict[str, Any], max_proposals: int, known_organs: tuple[str, ...]
) -> InferParams:
    prompt = data.get("prompt", defaults["prompt"])
    if not isinstance(prompt, str) or not prompt.strip():
        raise bad_request(f"'prompt' must name one or more organs (e.g. 'liver', 'left kidney, spleen', "
                          f"'all organs'). Known organs: {', '.join(known_organs)}")
    if len(prompt) > MAX_PROMPT_CHARS or any(ord(c) < 32 and c not in "\t\n" for c in prompt):
        raise bad_request(f"'prompt' must be plain text of at most {MAX_PROMPT_CHARS} characters")
    try:
        organs = tuple(parse_prompt(prompt, known=known_organs))
    except UnknownPromptError as error:
        raise bad_request(str(error)) from None

    num_proposals = _integer(data, "num_proposals", defaults["num_proposals"], 1, max_proposals)
    proposal_value = data.get("proposal")
    proposal = None
    if proposal_value not in (None, "", -1, "-1", "consensus"):
        proposal = _integer(data, "proposal", 0, 0, num_proposals - 1)
    modality = str(data.get("modality", "auto") or "auto")
    matched = [m for m in MODALITIES if m.lower() == modality.lower()]
    if not matched:
        raise bad_request(f"'modality' must be one of {', '.join(MODALITIES)}; got {modality!r}")
    return InferParams(
        prompt=prompt.strip(),
        organs=organs,
        num_proposals=num_proposals,
        steps=_integer(data, "steps", defaults["steps"], 1, MAX_STEPS),
        seed=_integer(data, "seed", defaults["seed"], 0, 2**31 - 1),
        proposal=proposal,
        modality=matched[0],
    )


def check_image_reference(image: Any, image_ids: list[str] | None, roots: list[str], upload_dir: str = "") -> None:
    """The `image` of a request: a datastore id, or a file/DICOM folder under one of the allowed roots, or
    (a file directly in `upload_dir`) the temporary copy MONAI Label makes of an image uploaded with the request.

    Anything else is refused before MONAI Label resolves it, so a request can neither probe nor read
    files elsewhere on the server (`../../etc/passwd`, `/etc/passwd`, encoded variants alike).
    `image_ids`: the local datastore's ids; None for a remote datastore (DICOMweb), which resolves ids itself.
    """
    if not isinstance(image, str) or not image:
        raise bad_request("'image' must be a datastore image id (GET /datastore/?output=all lists them)")
    if image_ids is not None and image in image_ids:
        return
    if os.path.isabs(image):
        path = os.path.realpath(image)
        under_root = any(os.path.commonpath([path, root]) == root for root in roots)
        uploaded = bool(upload_dir) and os.path.dirname(path) == upload_dir and os.path.isfile(path)
        if (under_root or uploaded) and os.path.exists(path):
            return
        raise HTTPException(status_code=403, detail=(
            f"image path {image!r} is not accepted: paths must name an existing NIfTI/NRRD file or DICOM series "
            f"folder under {', '.join(roots) or '(no folder: set --conf image_roots)'}"))
    if not SAFE_NAME.match(image) or ".." in image:
        raise bad_request(f"image {image!r} is not a valid image id: ids are plain names (letters, digits, '.', "
                          "'_', '-'); absolute paths are accepted under --conf image_roots")
    if image_ids is None:
        return
    raise HTTPException(status_code=404, detail=f"no image {image!r} in the datastore; "
                                                "GET /datastore/?output=all lists the ids")
