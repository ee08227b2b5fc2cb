"""Atomic file writing: a reader never sees a half-written file.

Plain standard library, at the bottom of the package: checkpoints (``config``), images and JSON
(``io``), Slicer segmentations (``slicer_io``), label sets and reports all write through it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "copy_atomic", "umask"]


def atomic_write(path: str | Path, write: Callable[[str], object], keep_suffix: bool = True) -> Path:
    """Write a file through ``write(tmp)`` into a temporary file next to ``path`` (same file system),
    flush it to disk and rename it over ``path``: readers see the old or the complete new file, never
    a partial one. The temporary name is hidden (``.<name>.<random>.tmp``) and, with ``keep_suffix``,
    ends in the file's own suffixes so writers that go by extension pick the right format; a
    watcher matching ``*.nii.gz`` would see it, so a datastore passes ``keep_suffix=False``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".tmp" + ("".join(path.suffixes) if keep_suffix else "")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp creates 0600; outputs are for others to read too
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def copy_atomic(src: str | Path, dest: str | Path, keep_suffix: bool = True) -> Path:
    """Copy ``src`` over ``dest`` atomically (see :func:`atomic_write`)."""
    return atomic_write(dest, lambda tmp: shutil.copyfile(src, tmp), keep_suffix)


def umask() -> int:
    """The process's file-creation mask (read without changing it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask
