"""Infer request parameters: parsed and checked before any work, so bad input gets a clear HTTP 400."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from fastapi import HTTPException
from monailabel.utils.others.generic import name_to_device, strtobool

from lib.datastore import SAFE_NAME
from progidiff.prompts import UnknownPromptError, parse_prompt

MAX_PROMPT_CHARS = 500
MAX_STEPS = 200
MODALITIES = ("auto", "CT", "MR")
# How the returned label map numbers the organs (see `label_values`).
LABEL_VALUES = ("auto", "compact", "model")
# Options MONAI Label itself reads from an infer request (its writer, its logger): what each accepts.
RESULT_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".seg.nrrd")
RESULT_DTYPES = ("uint8", "uint16", "int16", "int32", "float32")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


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
    label_values: str = "compact"  # "compact" (1..K in `organs` order) or "model" (the model's label ids)
    proposal_layers: bool = False  # return a .seg.nrrd: per organ the consensus and every proposal as a segment

    def values(self, organ_ids: dict[str, int]) -> dict[str, int]:
        """Organ → its value in the returned label map."""
        if self.label_values == "model":
            return {organ: organ_ids[organ] for organ in self.organs}
        return {organ: k for k, organ in enumerate(self.organs, start=1)}


def integer_param(data: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
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


def label_values(data: dict[str, Any]) -> str:
    """Which numbering the client reads the returned label map with.

    - "compact": values 1..K in the order of `label_names` in the JSON result. 3D Slicer's module sorts
      `label_names` by value and gives its i-th segment the voxels of value i+1, so values must run 1..K.
    - "model": each organ keeps the model's label id, as `/info` lists them. OHIF's panel asks with
      `output=image` (it never sees `label_names`) and maps values through the model's labels in `/info`.
    "auto" (the default) takes "model" for OHIF's client, which marks every infer with MONAI Label's
    `restore_label_idx` ("return the indexes as defined in the config file") or sends `label_prompt`,
    and "compact" otherwise.
    """
    value = data.get("label_values", "auto") or "auto"
    if value not in LABEL_VALUES:
        raise bad_request(f"'label_values' must be one of {', '.join(LABEL_VALUES)}; got {value!r}")
    if value == "auto":
        return "model" if "restore_label_idx" in data or data.get("label_prompt") else "compact"
    return value


def organs_from_label_prompt(label_prompt: Any, organ_ids: dict[str, int], known_organs: tuple[str, ...]) -> tuple[str, ...]:
    """OHIF's Class Prompts: `label_prompt` lists the ticked organs by their label ids in `/info`."""
    by_id = {value: organ for organ, value in organ_ids.items() if organ in known_organs}
    accepted = f"a list of label ids from /info (model labels: {', '.join(f'{o}={v}' for v, o in by_id.items())})"
    if not isinstance(label_prompt, list) or not label_prompt:
        raise bad_request(f"'label_prompt' must be {accepted}; got {label_prompt!r}")
    organs: list[str] = []
    for item in label_prompt:
        try:
            organ = by_id[int(item)] if not isinstance(item, bool) and float(item) == int(item) else None
        except (TypeError, ValueError, KeyError, OverflowError):
            organ = None
        if organ is None:
            raise bad_request(f"'label_prompt' holds {item!r}, which is no label of this model; accepted: {accepted}")
        if organ not in organs:
            organs.append(organ)
    return tuple(organs)


def _flag(data: dict[str, Any], key: str, default: bool) -> bool:
    value = data.get(key, default)
    try:
        return strtobool(value if isinstance(value, bool) else str(value))
    except ValueError:
        raise bad_request(f"'{key}' must be true or false; got {value!r}") from None


def monai_label_options(data: dict[str, Any]) -> dict[str, Any]:
    """The options MONAI Label reads itself, checked before any work (it fails on them with a bare 500, some only
    after sampling), and returned in the types it expects (flags as booleans, an empty level as INFO)."""
    choices = {"result_extension": RESULT_EXTENSIONS, "result_dtype": RESULT_DTYPES}
    for key, accepted in choices.items():
        if data.get(key) not in (None, "") and data[key] not in accepted:
            raise bad_request(f"'{key}' must be one of {', '.join(accepted)}; got {data[key]!r}"[:300])
    level = data.get("logging")
    if level not in (None, "") and (not isinstance(level, str) or level.upper() not in LOG_LEVELS):
        raise bad_request(f"'logging' must be one of {', '.join(LOG_LEVELS)}; got {level!r}"[:300])
    if _flag(data, "skip_writer", False):
        raise bad_request("'skip_writer' is not supported: this app always returns its answer as a label file")
    return {"logging": (level or "INFO").upper(), "result_compress": _flag(data, "result_compress", False),
            "skip_writer": False}


def check_device(data: dict[str, Any], server_device: torch.device) -> None:
    """A request's `device`, MONAI Label's option (3D Slicer sends back the one `/info` lists), must be the
    server's: the app keeps one model copy, on conf `device`.  Names map as MONAI Label maps them (a GPU's name
    to its `cuda:i`; `cuda` on a machine without one to `cpu`).  Another device gets a 400 rather than being
    silently ignored."""
    asked = data.get("device")
    if isinstance(asked, list) and len(asked) == 1:  # the option as /info lists it, echoed back
        asked = asked[0]
    if asked in (None, ""):
        return
    try:
        wanted = torch.device(name_to_device(asked)) if isinstance(asked, str) else None
    except RuntimeError:  # not a device torch knows
        wanted = None
    if wanted is None or (wanted.type, wanted.index or 0) != (server_device.type, server_device.index or 0):
        raise bad_request(f"'device' {asked!r}: this server runs on {server_device} (its conf 'device'); "
                          f"leave 'device' out or give '{server_device}'"[:300])


def parse_params(
    data: dict[str, Any], defaults: dict[str, Any], max_proposals: int, known_organs: tuple[str, ...],
    organ_ids: dict[str, int],
) -> InferParams:
    if data.get("label_prompt") not in (None, []):
        organs = organs_from_label_prompt(data["label_prompt"], organ_ids, known_organs)
        return _with_organs(data, defaults, max_proposals, ", ".join(organs), organs)
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
    return _with_organs(data, defaults, max_proposals, prompt.strip(), organs)


def _with_organs(data: dict[str, Any], defaults: dict[str, Any], max_proposals: int, prompt: str,
                 organs: tuple[str, ...]) -> InferParams:
    num_proposals = integer_param(data, "num_proposals", defaults["num_proposals"], 1, max_proposals)
    proposal_value = data.get("proposal")
    proposal = None
    if proposal_value not in (None, "", -1, "-1", "consensus"):
        proposal = integer_param(data, "proposal", 0, 0, num_proposals - 1)
    modality = str(data.get("modality", "auto") or "auto")
    matched = [m for m in MODALITIES if m.lower() == modality.lower()]
    if not matched:
        raise bad_request(f"'modality' must be one of {', '.join(MODALITIES)}; got {modality!r}")
    return InferParams(
        prompt=prompt,
        organs=organs,
        num_proposals=num_proposals,
        steps=integer_param(data, "steps", defaults["steps"], 1, MAX_STEPS),
        seed=integer_param(data, "seed", defaults["seed"], 0, 2**31 - 1),
        proposal=proposal,
        modality=matched[0],
        label_values=label_values(data),
        proposal_layers=_flag(data, "proposal_layers", defaults.get("proposal_layers", False)),
    )


def check_image_reference(image: Any, image_ids: list[str] | None, roots: list[str],
                          uploads: set[str] | frozenset[str] = frozenset()) -> None:
    """The `image` of a request: a datastore id, or a file/DICOM folder under one of the allowed roots, or
    (one of `uploads`) the temporary file an image uploaded with this request was saved to.

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
        uploaded = path in uploads
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
