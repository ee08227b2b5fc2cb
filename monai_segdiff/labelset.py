"""The label set of a studies folder: ``labels.json`` (``{"name": value}``) at the folder's top, or,
without one, ``label1..labelK`` up to the largest value found in the labels."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from .transforms import InputError


def label_names(studies: str | Path, items: Sequence[dict] = ()) -> list[str]:
    """Foreground names ordered by value 1..K."""
    path = Path(studies) / "labels.json"
    if path.is_file():
        try:
            mapping = {str(k): int(v) for k, v in json.loads(path.read_text()).items()}
        except (ValueError, AttributeError) as e:
            raise InputError(f"{path} must map label names to integer values: {e}") from e
        fg = sorted((v, k) for k, v in mapping.items() if v > 0)
        if [v for v, _ in fg] != list(range(1, len(fg) + 1)):
            raise InputError(f"{path}: label values must be 1..K without gaps, got {[v for v, _ in fg]}")
        return [k for _, k in fg]
    top = largest_label(items)
    if top < 1:
        raise InputError(f"no foreground label found under {Path(studies) / 'labels'}")
    return [f"label{i}" for i in range(1, top + 1)]


def largest_label(items: Sequence[dict]) -> int:
    """Largest label value over the items' label files (0 without any)."""
    return max((max_label(it["label"]) for it in items if it.get("label")), default=0)


def max_label(path: str | Path) -> int:
    """Largest value of a label file (a 0/255 picture mask counts as 0/1)."""
    from .segmenter import load_label

    return int(load_label(path).max())
