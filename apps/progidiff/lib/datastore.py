"""The app's local datastore: MONAI Label's `LocalDatastore` with label and index writes that are atomic.

`LocalDatastore.save_label` copies the uploaded file straight over the stored label, and the index
(`datastore_v2.json`) is rewritten in place, so a crash or a full disk mid-write leaves a truncated
label where the annotator's work was, or an index the server cannot read.  Here each file is written
beside its destination first and renamed over it in one step: readers and a restarted server see the
old version or the new one, never half of one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any

from filelock import FileLock
from monailabel.datastore.local import DataModel, LocalDatastore
from monailabel.interfaces.exception import ImageNotFoundException

from progidiff.io_utils import atomic_file

logger = logging.getLogger(__name__)


class AtomicLocalDatastore(LocalDatastore):
    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        obj = self._datastore.objects.get(image_id)
        if not obj:
            raise ImageNotFoundException(f"Image {image_id} not found")
        _, label_ext = self._to_id(os.path.basename(label_filename))
        name = self._filename(image_id, label_ext)
        dest = os.path.join(self._datastore.label_path(label_tag), name)
        with FileLock(self._lock_file):
            # ".part" is no datastore extension, so the folder watcher never takes the copy for a label.
            with atomic_file(dest, suffix=".part") as tmp:
                shutil.copyfile(label_filename, tmp)
            label_info = {**(label_info or {}), "ts": int(time.time()), "name": name}
            obj.labels[label_tag] = DataModel(info=label_info, ext=label_ext)
            self._update_datastore_file(lock=False)
        logger.info("saved label %s => %s (%s)", image_id, label_tag, dest)
        return image_id

    def _update_datastore_file(self, lock: bool = True) -> None:
        if lock:
            with FileLock(self._lock_file):
                self._write_index()
        else:
            self._write_index()

    def _write_index(self) -> None:
        self._ignore_event_config = True  # as LocalDatastore does: its own write is not an outside change
        with atomic_file(self._datastore_config_path, suffix=".part") as tmp:
            tmp.write_text(json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str))
        self._config_ts = os.stat(self._datastore_config_path).st_mtime
