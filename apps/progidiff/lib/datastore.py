"""The app's local datastore: MONAI Label's `LocalDatastore`, checked and atomic.

- Viewer names: 3D Slicer uploads a volume under its node name ("5: CT ABDOMEN") and then infers and saves
  labels under that same name; such a name is stored under a safe id derived from it (`image_id_for`,
  reported in the upload's response) and every later request naming the volume reaches that id.
- Checked: an uploaded image must be a readable 3D image, a label a readable image of its image's
  shape, and ids and tags plain names (no `/`, no `..`); anything else gets HTTP 400 saying what is
  accepted, before anything is written.  (A tag of "../../x" would otherwise write outside the studies.)
- Atomic: `LocalDatastore` copies uploads straight over stored files and rewrites its index
  (`datastore_v2.json`) in place, so a crash or a full disk mid-write leaves a truncated label where
  the annotator's work was, or an index the server cannot read.  Here each file is written beside its
  destination and renamed over it in one step: readers and a restarted server see the old version or
  the new one, never half of one.
- One index, several processes: the server and its scoring and training subprocesses each hold the index
  in memory.  `LocalDatastore` writes its own copy over the file, so a score stored by a subprocess while
  the server saved a label was lost (or the label's entry).  Every change here is a read-modify-write under
  the datastore's file lock (`_changing_index`): the file is read again if another process wrote it.
- Removals are final at once: `LocalDatastore` deletes the files and leaves the index to its folder
  watcher (the id is listed until the watcher runs); here the entry leaves the index in the same step.
"""

from __future__ import annotations

import contextlib
import filecmp
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from typing import Any

from fastapi import HTTPException
from filelock import FileLock
import numpy as np
from monai.data import MetaTensor
from monai.transforms import LoadImage
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore, LocalDatastoreModel

from progidiff.image_header import ImplausibleImage, check_declared_volume
from progidiff.io_utils import atomic_file
from progidiff.labels import ORGAN_IDS, class_map_from_label_info

logger = logging.getLogger(__name__)

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ACCEPTED_FILES = "NIfTI (.nii, .nii.gz) or NRRD (.nrrd) holding one 3D volume"
FLOAT_MAPS = ("probability", "uncertainty")  # tags of the per-voxel float maps the infer task stores


def image_id_for(name: str) -> str:
    """The id an image is stored under: `name` itself when it is a plain name, else (a viewer's volume name
    such as "5: CT ABDOMEN") its plain characters plus a short digest of the whole name, so two names never
    meet. Names that look like paths (`/`, `\\`, `..`) or hold control characters are refused."""
    if isinstance(name, str) and SAFE_NAME.match(name) and ".." not in name:
        return name
    if (not isinstance(name, str) or not name.strip() or len(name) > 128 or any(c in name for c in "/\\")
            or ".." in name or any(ord(c) < 32 for c in name)):
        check_name("image id", name)  # raises, saying what is accepted
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")[:100] or "image"
    return f"{base}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def check_name(kind: str, value: str) -> str:
    if not isinstance(value, str) or not SAFE_NAME.match(value) or ".." in value:
        raise HTTPException(400, f"{kind} {value!r} is not accepted: use 1-128 letters, digits, '.', '_' or '-', "
                                 "starting with a letter or digit, without '..'")
    return value


def check_header(path: str, max_bytes: float, kind: str) -> None:
    """Refuse, from the header alone, a file too large to work on (413) or no plausible CT/MR volume (400)."""
    try:
        check_declared_volume(path, max_bytes, kind)
    except ImplausibleImage as error:
        raise HTTPException(413 if error.too_large else 400, str(error)) from None


def read_volume(path: str, kind: str) -> MetaTensor:
    """Read the whole file with MONAI (a truncated file fails here, not in a later request): one 3D volume."""
    try:
        image = LoadImage(image_only=True)(path)
    except Exception as error:  # noqa: BLE001 - any reader failure means the upload is not a usable image
        raise HTTPException(400, f"the {kind} is not a readable image ({type(error).__name__}); "
                                 f"accepted: {ACCEPTED_FILES}") from None
    if image.ndim == 4 and image.shape[3] == 1:
        image = image[..., 0]
    shape = tuple(int(s) for s in image.shape)
    if len(shape) != 3 or min(shape) < 2:
        raise HTTPException(400, f"the {kind} has shape {shape}; accepted: {ACCEPTED_FILES}")
    return image


def check_on_grid(label: MetaTensor, image: MetaTensor, image_id: str) -> None:
    """A label lies on its image's voxel grid: the same shape, the affine within a tenth of a voxel."""
    if tuple(label.shape) != tuple(image.shape):
        raise HTTPException(400, f"the label has shape {tuple(label.shape)} but image {image_id!r} has "
                                 f"{tuple(image.shape)}; a label must have its image's shape")
    spacing = float(np.abs(np.asarray(image.affine)[:3, :3]).max())
    offset = float(np.abs(np.asarray(label.affine, dtype=float) - np.asarray(image.affine, dtype=float)).max())
    if offset > 0.1 * spacing:
        raise HTTPException(400, f"the label's grid differs from image {image_id!r}'s by up to {offset:.1f} mm "
                                 "(affine); a label must lie on its image's voxel grid")


def check_label_values(label: MetaTensor, label_info: dict[str, Any]) -> None:
    """A label map's values are integers from 0 to 255 that name organs: the schema's ids, or the values its
    `label_info` names."""
    values = np.asarray(label)
    if not np.isfinite(values).all() or not np.array_equal(values, np.round(values)) or values.min() < 0 \
            or values.max() > 255:
        raise HTTPException(400, "the label holds values that are not integers from 0 to 255 (NaN, negative, "
                                 "fractional or larger); a label is a label map of organ values")
    class_map = class_map_from_label_info(label_info or {})
    named = set(class_map) if class_map is not None else set(ORGAN_IDS.values())
    unknown = sorted(set(np.unique(values).astype(int).tolist()) - named - {0})
    if unknown:
        raise HTTPException(400, f"label values {unknown[:10]} name no organ; accepted: the schema's values "
                                 f"({', '.join(f'{o}={v}' for o, v in ORGAN_IDS.items())}) or values named in "
                                 "'label_info' ([{\"name\": \"liver\", \"idx\": 1}, ...])")


class SafeLocalDatastore(LocalDatastore):
    def __init__(self, datastore_path: str, *args, max_bytes: float = 8 * 2**30, **kwargs):
        """`max_bytes`: the largest upload to work on, as float32 (the server's `max_memory_gb`)."""
        # One lock object for every index access: re-entrant in a thread (a change may reload the index),
        # exclusive between threads and processes.
        self._index_lock = FileLock(os.path.join(datastore_path, ".lock"))
        self._index_stamp: tuple[int, int, int] | None = None
        super().__init__(datastore_path, *args, **kwargs)
        self.max_bytes = max_bytes
        if getattr(self, "_handler", None) is not None:
            # A rename is a "moved" event, which LocalDatastore's folder watcher does not handle: without
            # this, an index written by another process (a scoring or train task) would never be reloaded.
            self._handler.on_moved = self._on_moved_event

    def _on_moved_event(self, event) -> None:
        if event.dest_path != self._datastore_config_path:
            self._on_any_event(event)  # an image or label renamed into place: reconcile with the folder
        else:
            self._init_from_datastore_file()  # reads only if another process wrote it

    def known_id(self, image_id: str) -> str:
        """`image_id` as stored: a viewer's volume name reaches the id its upload was stored under."""
        if image_id in self._datastore.objects:
            return image_id
        try:
            mapped = image_id_for(image_id)
        except HTTPException:
            return image_id
        return mapped if mapped in self._datastore.objects else image_id

    def get_image_uri(self, image_id: str) -> str:
        return super().get_image_uri(self.known_id(image_id))

    def get_image_info(self, image_id: str) -> dict[str, Any]:
        return super().get_image_info(self.known_id(image_id))

    def get_label_by_image_id(self, image_id: str, tag: str) -> str:
        return super().get_label_by_image_id(self.known_id(image_id), tag)

    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        return super().get_label_uri(self.known_id(label_id), label_tag)  # a label's id is its image's

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        derived_id, image_ext = self._to_id(os.path.basename(image_filename))
        image_id = image_id_for(image_id or derived_id)
        check_header(image_filename, self.max_bytes, "image")
        if not np.isfinite(np.asarray(read_volume(image_filename, "image"))).all():
            raise HTTPException(400, "the image holds NaN or infinite voxels; accepted: finite intensities (HU for CT)")
        name = self._filename(image_id, image_ext)
        with self._changing_index():
            previous = self._datastore.objects.get(image_id)
            old_path = self.get_image_uri(image_id) if previous is not None else ""
            same = bool(old_path) and os.path.exists(old_path) and filecmp.cmp(old_path, image_filename, shallow=False)
            self._copy_atomically(image_filename, os.path.join(self._datastore.image_path(), name))
            if old_path and os.path.realpath(old_path) != os.path.realpath(os.path.join(self._datastore.image_path(), name)):
                os.unlink(old_path)  # the same id under another extension: one image per id
            labels, kept_info = {}, {}
            if previous is not None and same:
                labels, kept_info = previous.labels, previous.image.info
            elif previous is not None:  # another image under this id: its labels and scores describe the old one
                for tag in previous.labels:
                    stale = self.get_label_uri(image_id, tag)
                    if stale and os.path.exists(stale):
                        os.unlink(stale)
                logger.warning("image %s was replaced by a different image: its labels %s were removed", image_id,
                               sorted(previous.labels))
            info = {**kept_info, **(image_info or {}), "ts": int(time.time()), "name": name}
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=image_ext), labels=labels)
        logger.info("added image %s", image_id)
        return image_id

    def remove_image(self, image_id: str) -> None:
        """The image, its labels and its entry go in one step (a restarted server cannot bring it back)."""
        with self._changing_index():
            known = self.known_id(image_id)
            obj = self._datastore.objects.get(known)
            if obj is None:
                raise HTTPException(404, f"no image {image_id!r} in the datastore; GET /datastore/?output=all lists them")
            for tag in list(obj.labels):
                self._remove_label_file(known, tag)
            self._remove_file(os.path.join(self._datastore.image_path(), self._filename(known, obj.image.ext)))
            del self._datastore.objects[known]
        logger.info("removed image %s and its labels", known)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        with self._changing_index():
            known = self.known_id(label_id)
            obj = self._datastore.objects.get(known)
            if obj is None or label_tag not in obj.labels:
                raise HTTPException(404, f"image {label_id!r} has no label {label_tag!r}; GET /datastore/?output=all "
                                         "lists the labels")
            self._remove_label_file(known, label_tag)
            del obj.labels[label_tag]
        logger.info("removed label %s => %s", known, label_tag)

    def _remove_label_file(self, image_id: str, tag: str) -> None:
        label = self._datastore.objects[image_id].labels[tag]
        self._remove_file(os.path.join(self._datastore.label_path(tag), self._filename(image_id, label.ext)))

    def _remove_file(self, path: str) -> None:
        if os.path.exists(path):
            os.unlink(path)  # the folder watcher's reconciliation then finds the index already without it

    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        with self._changing_index():
            obj = self._datastore.objects.get(self.known_id(image_id))
            if obj is None:
                raise HTTPException(404, f"no image {image_id!r} in the datastore")
            obj.image.info.update(info)

    def update_label_info(self, label_id: str, label_tag: str, info: dict[str, Any]) -> None:
        with self._changing_index():
            label = self._datastore.label(self.known_id(label_id), label_tag)
            if not label:
                raise HTTPException(404, f"image {label_id!r} has no label {label_tag!r}")
            label.info.update(info)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        image_id_for(image_id)  # refuses names that look like paths, saying what is accepted
        image_id = self.known_id(image_id)
        check_name("label tag", label_tag)
        obj = self._datastore.objects.get(image_id)
        if not obj:
            raise HTTPException(404, f"no image {image_id!r} in the datastore; GET /datastore/?output=all lists them")
        check_header(label_filename, self.max_bytes, "label")
        label = read_volume(label_filename, "label")
        image = read_volume(self.get_image_uri(image_id), "stored image")
        check_on_grid(label, image, image_id)
        if label_tag not in FLOAT_MAPS:  # the app's own per-voxel float maps are no label maps
            check_label_values(label, label_info)
        _, label_ext = self._to_id(os.path.basename(label_filename))
        name = self._filename(image_id, label_ext)
        with self._changing_index():
            obj = self._datastore.objects.get(image_id)
            if obj is None:  # removed by another request meanwhile
                raise HTTPException(404, f"no image {image_id!r} in the datastore")
            self._copy_atomically(label_filename, os.path.join(self._datastore.label_path(label_tag), name))
            info = {**(label_info or {}), "ts": int(time.time()), "name": name}
            obj.labels[label_tag] = DataModel(info=info, ext=label_ext)
        logger.info("saved label %s => %s", image_id, label_tag)
        return image_id

    @staticmethod
    def _copy_atomically(source: str, dest: str) -> None:
        # ".part" is no datastore extension, so the folder watcher never takes the copy for a study.
        with atomic_file(dest, suffix=".part") as tmp:
            shutil.copyfile(source, tmp)

    @contextlib.contextmanager
    def _changing_index(self) -> Iterator[None]:
        """Read-modify-write of the index: under the lock, read again what another process wrote since we
        last read or wrote it, let the caller change it, write it (atomically)."""
        with self._index_lock:
            self._read_index_if_changed()
            yield
            self._write_index()

    def _read_index_if_changed(self) -> None:
        if not os.path.exists(self._datastore_config_path):
            return
        stamp = self._stamp()
        if stamp != self._index_stamp:
            with open(self._datastore_config_path) as index:
                self._datastore = LocalDatastoreModel.model_validate_json(index.read())
            self._datastore.base_path = self._datastore_path
            self._index_stamp = stamp
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

    def _stamp(self) -> tuple[int, int, int]:
        """Changes with every write: each one is a new file renamed into place."""
        stat = os.stat(self._datastore_config_path)
        return stat.st_ino, stat.st_mtime_ns, stat.st_size

    def _init_from_datastore_file(self, throw_exception: bool = False) -> None:
        """LocalDatastore's reload (start-up, its folder watcher, its reconciliation), under the one lock."""
        try:
            with self._index_lock:
                self._read_index_if_changed()
        except ValueError as error:
            logger.error("the datastore index %s cannot be read: %s", self._datastore_config_path, error)
            if throw_exception:
                raise

    def _reconcile_datastore(self) -> None:
        """LocalDatastore's reconciliation with the folder, as one read-modify-write (it re-reads the index
        and writes it back; another process's write between the two would be lost)."""
        with self._index_lock:
            super()._reconcile_datastore()

    def _update_datastore_file(self, lock: bool = True) -> None:
        with self._index_lock:
            self._write_index()

    def _write_index(self) -> None:
        self._ignore_event_config = True  # as LocalDatastore does: its own write is not an outside change
        with atomic_file(self._datastore_config_path, suffix=".part") as tmp:
            tmp.write_text(json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str))
        self._index_stamp = self._stamp()
        self._config_ts = os.stat(self._datastore_config_path).st_mtime
