"""A small thread-safe LRU cache with single-flight computation, and file signatures for cache keys.

Used by the MONAI Label app to reuse one ensemble prediction for the same image, model file and
settings (the segmentation and the uncertainty model answer from the same sampling run), and by
anything else that wants "compute once per key, keep the last few". No ``monailabel`` import here.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any, Generic, TypeVar

__all__ = ["LRUCache", "file_signature"]

V = TypeVar("V")


def file_signature(path: str | os.PathLike) -> tuple[str, int, int]:
    """``(real path, mtime in ns, size)``: changes whenever the file is replaced or rewritten.

    Raises ``FileNotFoundError`` when the file does not exist.
    """
    real = os.path.realpath(Path(path))
    st = os.stat(real)
    return real, st.st_mtime_ns, st.st_size


class _Pending:
    """One computation in flight: waiters block on ``event`` and then read ``value`` or ``error``."""

    __slots__ = ("event", "value", "error")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None


class LRUCache(Generic[V]):
    """Least-recently-used cache of at most ``maxsize`` entries, safe to share between threads.

    :meth:`get_or_compute` runs ``compute`` once per missing key even when several threads ask for
    the same key at the same time (the others wait for that result instead of computing it again);
    different keys compute in parallel. ``maxsize=0`` keeps nothing but still de-duplicates
    concurrent computations.

    Args:
        maxsize: number of entries kept; the least recently used entry is dropped first.
    """

    def __init__(self, maxsize: int = 4) -> None:
        if maxsize < 0:
            raise ValueError(f"maxsize must be >= 0, got {maxsize}")
        self.maxsize = int(maxsize)
        self._data: OrderedDict[Hashable, V] = OrderedDict()
        self._pending: dict[Hashable, _Pending] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._data

    def keys(self) -> list[Hashable]:
        """Keys from least to most recently used."""
        with self._lock:
            return list(self._data)

    def get(self, key: Hashable, default: V | None = None) -> V | None:
        """The cached value (marked as most recently used), or ``default``."""
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                self.hits += 1
                return self._data[key]
            self.misses += 1
            return default

    def put(self, key: Hashable, value: V) -> None:
        """Store ``value`` as the most recently used entry, dropping the oldest beyond ``maxsize``."""
        with self._lock:
            self._put(key, value)

    def _put(self, key: Hashable, value: V) -> None:
        if self.maxsize == 0:
            return
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.maxsize:
            self._data.popitem(last=False)

    def pop(self, key: Hashable, default: V | None = None) -> V | None:
        with self._lock:
            return self._data.pop(key, default)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def get_or_compute(self, key: Hashable, compute: Callable[[], V]) -> tuple[V, bool]:
        """Return ``(value, hit)``; on a miss run ``compute()`` (once across threads) and cache it.

        ``hit`` is True when the value came from the cache or from another thread's computation of
        the same key. An exception raised by ``compute`` propagates to every caller waiting for that
        key and nothing is cached.
        """
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                self.hits += 1
                return self._data[key], True
            pending = self._pending.get(key)
            owner = pending is None
            if owner:
                pending = self._pending[key] = _Pending()
                self.misses += 1
            else:
                self.hits += 1
        if not owner:
            pending.event.wait()
            if pending.error is not None:
                raise pending.error
            return pending.value, True
        try:
            value = compute()
        except BaseException as e:
            pending.error = e
            raise
        else:
            pending.value = value
            with self._lock:
                self._put(key, value)
        finally:
            with self._lock:
                self._pending.pop(key, None)
            pending.event.set()
        return value, False
