"""Background work that yields to interactive work on a shared CPU.

An interactive request (an Auto Segmentation the annotator waits for) holds a :class:`BusyMarker`
while it runs; background work (active-learning scoring, run by MONAI Label in a subprocess at
start-up and after every training) lowers its own priority with :func:`lower_priority` and, between
two images, waits with :meth:`BusyMarker.wait_until_idle` while any marker is held. The two sides
only share a key (e.g. the path of the served model file) and the marker folder, so they may live in
different processes.

A marker is one small file per holder, ``<folder>/<key hash>-<pid>-<random>.busy``, removed when
the holder's ``with`` block ends (also on an exception). A marker left behind by a process that died
(killed server, power cut) is ignored, and deleted, once its process no longer exists (POSIX) or it
is older than ``stale_after`` seconds, so a crashed infer never stops background work for good.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

__all__ = ["STALE_AFTER_S", "BusyMarker", "default_folder", "lower_priority"]

STALE_AFTER_S = 30 * 60.0  # a marker older than this is ignored whatever its process (a hung holder)


def default_folder() -> Path:
    """``<system temp>/segdiff-busy-<uid>``: one folder per user, shared by all of that user's processes."""
    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    return Path(tempfile.gettempdir()) / f"segdiff-busy-{user}"


def _process_exists(pid: int) -> bool:
    """True unless ``pid`` is known to be gone (POSIX only; elsewhere the age limit decides)."""
    if os.name != "posix" or pid <= 0:
        return True
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    except OSError:
        return True
    return True


class BusyMarker:
    """"Interactive work is running" for one key, visible to every process of the same user.

    Args:
        key: what the work is about, the same string on both sides (e.g. the served model's path).
        folder: where markers live (default :func:`default_folder`).
        stale_after: seconds after which a marker is ignored even if its process still exists.

    Example::

        marker = BusyMarker("/studies/.segdiff/model/segdiff.pt")
        with marker.hold():          # interactive side (the infer task)
            segment(image)
        marker.wait_until_idle()     # background side, between two images
    """

    def __init__(self, key: str, folder: str | os.PathLike | None = None, stale_after: float = STALE_AFTER_S) -> None:
        self.key = str(key)
        self.folder = Path(folder) if folder is not None else default_folder()
        self.stale_after = float(stale_after)
        self.prefix = hashlib.sha1(self.key.encode()).hexdigest()[:16]

    @contextlib.contextmanager
    def hold(self) -> Iterator[Path]:
        """Hold a marker for the duration of the ``with`` block; yields its path. If the marker cannot
        be written (read-only temp folder) the work still runs, unmarked."""
        path = self.folder / f"{self.prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}.busy"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"key": self.key, "pid": os.getpid(), "started": time.time()}))
        except OSError:
            path = None
        try:
            yield path
        finally:
            if path is not None:
                with contextlib.suppress(OSError):
                    path.unlink()

    def holders(self, now: float | None = None) -> list[Path]:
        """Live markers of this key; stale ones (dead process, or older than ``stale_after``) are
        deleted on the way (best effort)."""
        now = time.time() if now is None else now
        live = []
        for path in self.folder.glob(f"{self.prefix}-*.busy"):
            try:
                age = now - path.stat().st_mtime
                pid = int(path.name.split("-")[1])
            except (OSError, ValueError, IndexError):
                continue  # removed meanwhile, or not ours
            if age > self.stale_after or not _process_exists(pid):
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            live.append(path)
        return live

    def is_busy(self) -> bool:
        """Whether interactive work for this key is running now."""
        return bool(self.holders())

    def wait_until_idle(
        self,
        poll: float = 0.5,
        timeout: float | None = None,
        sleep: Callable[[float], object] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> float:
        """Block while a marker is held; return the seconds waited (0.0 if idle at once).

        Args:
            poll: seconds between two looks at the folder.
            timeout: give up after this many seconds (None: wait as long as markers are live; a
                marker goes stale after ``stale_after`` anyway).
            sleep, clock: injectable for tests.
        """
        start = None
        while self.is_busy():
            start = clock() if start is None else start
            if timeout is not None and clock() - start >= timeout:
                break
            sleep(poll)
        return 0.0 if start is None else clock() - start


def lower_priority(niceness: int = 19, threads: int | None = 1) -> dict:
    """Make this process background work: raise its nice value to ``niceness`` (where the OS has
    ``os.nice``; it cannot be lowered again without privileges, so call it only in a process of its
    own, such as MONAI Label's scoring subprocess) and limit torch to ``threads`` intra-op threads
    (None: unchanged). Returns ``{"nice": value or None, "threads": torch's thread count}``."""
    nice = None
    if hasattr(os, "nice"):
        try:
            current = os.nice(0)
            nice = os.nice(max(0, int(niceness) - current))
        except OSError:
            nice = None
    if threads is not None:
        torch.set_num_threads(max(1, int(threads)))
    return {"nice": nice, "threads": torch.get_num_threads()}
