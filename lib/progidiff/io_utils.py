"""Atomic writes: a crash mid-write must never leave a half-written model or label behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _process_umask() -> int:
    """The umask this process was started with (read once: setting it to read it is not thread-safe)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


# mkstemp/mkdtemp create 0600 files and 0700 folders; a published model, adapter or label must get the modes
# any other file gets (e.g. 0644/0755), or a server or viewer run as another user cannot read it.
_UMASK = _process_umask()
_FILE_MODE = 0o666 & ~_UMASK
_FOLDER_MODE = 0o777 & ~_UMASK


@contextlib.contextmanager
def atomic_file(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or "".join(path.suffixes), dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        tmp.chmod(_FILE_MODE)  # after the writer: one that replaced the file made it private again
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; on success it replaces `path`.

    The old folder is first renamed aside and removed only after the new one is in place, so at
    every instant one complete version exists on disk (`recover_directory` undoes an interrupted swap).
    One writer per folder at a time (MONAI Label runs one training task at a time).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.new-", dir=path.parent))
    try:
        yield tmp
        _give_default_modes(tmp)
        recover_directory(path)  # an earlier swap killed between its renames: its old folder is the only version
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
        for stale in path.parent.glob(f".{path.name}.new-*"):  # left by publishes that were killed mid-write
            shutil.rmtree(stale, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _give_default_modes(folder: Path) -> None:
    """The modes of any other file for `folder` and everything in it: mkdtemp and some writers (safetensors
    writes its files 0600) keep what they create private."""
    folder.chmod(_FOLDER_MODE)
    for item in folder.rglob("*"):
        item.chmod(_FOLDER_MODE if item.is_dir() else _FILE_MODE)


def recover_directory(path: str | Path) -> Path:
    """If a swap was killed between its two renames, put the previous complete version back."""
    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    if not path.exists() and old.is_dir():
        os.replace(old, path)
    return path


def recover_directories(parent: str | Path) -> None:
    """`recover_directory` for every folder under `parent` (e.g. one adapter per modality)."""
    for old in Path(parent).glob(".*.old"):
        recover_directory(old.with_name(old.name[1 : -len(".old")]))


def published_folders(parent: str | Path, marker: str) -> list[Path]:
    """The folders under `parent` that hold `marker`, leaving out the hidden ones a swap works in."""
    return sorted(f.parent for f in Path(parent).glob(f"*/{marker}") if not f.parent.name.startswith("."))
