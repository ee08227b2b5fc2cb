"""Storing a submitted label in a studies folder so that nothing an annotator made is lost.

The steps the app's datastore takes for every Submit Label, as library functions (the app maps
:class:`InputError` to HTTP 422 and :class:`LabelConflict` to 409):

1. :func:`submitted_names`: the segment names of the values 1..n (3D Slicer's ``label_info`` list, or a
   ``.seg.nrrd``'s own segments); :func:`check_submission`: the label fits its image and every value is
   named (or, sent without names, is in the studies' label set: :func:`check_values_in_set`).
2. ``labelset.extend_label_set``: the names join the studies' label set (new names get new values).
3. :func:`keep_upload`: the byte-exact upload and its ``label_info`` under ``.segdiff/uploads/<tag>/``.
4. :func:`stage_label`: the label rewritten to the set's values beside the store, checked again;
   :func:`refuse_empty_over` refuses an empty label over a non-empty one; :func:`keep_replaced` keeps the
   version a new label replaces under ``.segdiff/replaced/<tag>/``.
5. :func:`save_answer`: what was done, for the annotator (the label set, each segment's value, names
   added or dropped, warnings).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from monai.data import MetaTensor

from .atomic import atomic_write, copy_atomic
from .errors import InputError
from .labelset import LABELS_FILE, LabelSet, SegmentMapping, max_label, write_label
from .slicer_io import is_seg_nrrd, segment_names
from .validation import check_label_file

__all__ = [
    "LabelConflict", "REPLACED", "UPLOADS", "submitted_names", "check_submission", "check_named", "check_in_set",
    "check_values_in_set",
    "bootstrap_names", "keep_upload", "keep_replaced", "stage_label", "refuse_empty_over", "save_answer",
]

REPLACED = Path(".segdiff") / "replaced"  # the version a new label replaced, one per image and tag
UPLOADS = Path(".segdiff") / "uploads"  # byte-exact label uploads, one per image and tag


class LabelConflict(InputError):
    """A label that would destroy a stored one (an empty label over a non-empty one)."""


def submitted_names(label_info: dict[str, Any], label_file: str | Path) -> list[str] | None:
    """The segment names of a submitted label, for its values 1..n: 3D Slicer's ``label_info`` list
    (exported in that order), a ``.seg.nrrd``'s own segment names, or None (no names sent)."""
    given = label_info.get("label_info")
    if isinstance(given, list) and given:
        return [str(e.get("name", "")) if isinstance(e, dict) else str(e) for e in given]
    if is_seg_nrrd(label_file):
        try:
            return segment_names(label_file)
        except ValueError as e:
            raise InputError(str(e)) from None
    return None


def check_submission(label_file: str | Path, image: MetaTensor, names: list[str] | None) -> dict | None:
    """Check a submitted label against its image (``validation.check_label_file``) and its names: every
    value 1..n must have a name. Returns the file's values and foreground count (None for a
    ``.seg.nrrd`` with names, whose segments are read by name)."""
    if names is not None and is_seg_nrrd(label_file):
        check_label_file(label_file, image, None, {n: i + 1 for i, n in enumerate(names)})
        return None
    found = check_label_file(label_file, image)
    if names is not None:
        check_named(found.get("values", []), names)
    return found


def check_named(values: Iterable[int], names: Sequence[str]) -> None:
    """Every value of a submitted label must be one of the ``len(names)`` named segments (1..n)."""
    unnamed = [v for v in values if v > len(names)]
    if unnamed:
        raise InputError(f"label values {unnamed} are not named by label_info ({len(names)} segment(s): "
                         f"{', '.join(names) or 'none'}): each value 1..n must be named")


def check_values_in_set(studies: str | Path, values: Iterable[int]) -> None:
    """A label sent without segment names must use the label set's values; a folder without a label set
    yet takes ``label1..labelK`` (:func:`bootstrap_names`)."""
    if (Path(studies) / LABELS_FILE).is_file():
        check_in_set(values, LabelSet.load(studies))


def check_in_set(values: Iterable[int], labels: LabelSet) -> None:
    """Values of a label sent without segment names must be values of ``labels``."""
    unknown = [v for v in values if v > len(labels)]
    if unknown:
        raise InputError(f"label values {unknown} are outside the label set {labels.to_dict()}; send label_info "
                         "naming each segment (3D Slicer does) to add labels")


def bootstrap_names(found: dict | None, stored_labels: Sequence[str | Path]) -> list[str]:
    """Names of the values 1..K for a folder without ``labels.json``: ``label1..labelK`` up to the largest
    value already stored (or, without names, submitted), as the library reads such a folder."""
    top = max(found["values"]) if found and found.get("values") else 0
    for path in stored_labels:
        try:
            top = max(top, max_label(path))
        except InputError:
            continue
    return [f"label{i}" for i in range(1, top + 1)]


def keep_upload(studies: str | Path, src: str | Path, tag: str, name: str, label_info: dict[str, Any]) -> str:
    """Keep the byte-exact upload (and the request's ``label_info``) as ``.segdiff/uploads/<tag>/<name>``;
    returns that path relative to ``studies``."""
    dest = Path(studies) / UPLOADS / tag / name
    copy_atomic(src, dest, keep_suffix=False)
    text = json.dumps({"label_info": label_info, "ts": int(time.time())}, default=str)
    atomic_write(f"{dest}.json", lambda tmp: Path(tmp).write_text(text), keep_suffix=False)
    return os.path.relpath(dest, studies)


def keep_replaced(studies: str | Path, path: str | Path, tag: str) -> Path:
    """Keep the version a new label replaces (or a delete removes) as ``.segdiff/replaced/<tag>/<file>``."""
    return copy_atomic(path, Path(studies) / REPLACED / tag / Path(path).name, keep_suffix=False)


def stage_label(src: str | Path, image: MetaTensor, studies: str | Path, mapping: SegmentMapping | None,
                labels: LabelSet, suffix: str) -> tuple[Path, dict]:
    """Write the label with the set's values (``labelset.write_label``) to a hidden file in
    ``<studies>/.segdiff`` (same file system as the store: it is renamed into place) and check it again;
    ``(staged file, its values and foreground count)``. Nothing is left behind on failure."""
    work = Path(studies) / ".segdiff"
    work.mkdir(parents=True, exist_ok=True)
    staged = work / f".staged-{uuid.uuid4().hex}{suffix}"
    try:
        write_label(src, staged, mapping.values if mapping else {}, work, labels.to_dict())
        return staged, check_label_file(staged, image)
    except (InputError, OSError, RuntimeError, ValueError) as e:
        staged.unlink(missing_ok=True)
        raise InputError(f"cannot store the label: {str(e).splitlines()[0][:200]}") from None


def refuse_empty_over(stored: dict, previous: str | Path, image: MetaTensor, what: str) -> None:
    """:class:`LabelConflict` when an empty label would replace the non-empty ``previous`` one (a
    ``previous`` that cannot be read holds nothing to protect)."""
    if stored["foreground_voxels"]:
        return
    try:
        foreground = check_label_file(previous, image)["foreground_voxels"]
    except InputError:
        return
    if foreground:
        raise LabelConflict(f"the submitted {what} is empty and would replace a non-empty one; delete the label "
                            "first (DELETE /datastore/label) to clear it")


def save_answer(labels: LabelSet, mapping: SegmentMapping | None, stored: dict, upload: str) -> dict[str, Any]:
    """What a save did, for the client (3D Slicer shows the answer): the label set, the value each
    submitted segment got, names added to the set or dropped, warnings."""
    answer: dict[str, Any] = {"label_set": labels.to_dict(), "upload_kept": upload}
    warnings = []
    if mapping is not None:
        answer["segments"] = {mapping.names[k]: v for k, v in mapping.values.items() if v}
        answer["remapped"] = {str(k): v for k, v in mapping.changes.items()}
        if mapping.added:
            answer["added"] = mapping.added
        if mapping.dropped:
            answer["dropped"] = sorted(mapping.dropped)
            warnings.append(f"segment(s) {', '.join(sorted(mapping.dropped))} not stored: 'uncertain' is the "
                            "uncertainty model's view, not a label")
    if not stored["foreground_voxels"]:
        warnings.append("the stored label is empty (no foreground voxel): the image counts as showing none of the labels")
    if warnings:
        answer["warnings"] = warnings
    return answer
