"""The studies folder as MONAI Label's `LocalDatastore`, hardened for a server that takes uploads from
anywhere and runs for days.

* Image ids and label tags are file names, never paths: ``..``, ``/``, ``\\`` or a leading ``.`` -> 400.
* Uploads are read the way training and inference read them before anything is stored: an image that
  is not an image, truncated, 4D, too large or all NaN -> 422; a label whose grid (shape or affine) is
  not its image's, whose values are not whole numbers or are not named by the request's ``label_info``
  -> 422; a label for an image that does not exist -> 404. A rejected upload never touches the stored
  files.
* A label is stored in the studies' label set (``labels.json``, ``monai_segdiff.labelset``): segments
  are mapped by name, a new name extends the set, only the ``uncertain`` segment is dropped, and the
  byte-exact upload is kept as ``<studies>/.segdiff/uploads/<tag>/<file>``.
* A user's label is never lost: an empty label does not replace a non-empty one (409), an image that
  has labels is not replaced by another upload under its id (409), and the version a new label replaces
  (or an admin's ``DELETE`` removes) is kept as ``<studies>/.segdiff/replaced/<tag>/<file>``.
* Files are written atomically (temporary file in the same folder + rename): no reader -- the server,
  a training or scoring subprocess, a crash -- ever sees half a label, image or ``datastore_v2.json``.
  A ``datastore_v2.json`` that cannot be parsed (a crash of an older version) is set aside and the
  datastore rebuilt from the files, instead of the server refusing to start.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable
from types import SimpleNamespace
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore, LocalDatastoreModel
from monailabel.interfaces.datastore import DefaultLabelTag

from monai_segdiff.errors import InputError
from monai_segdiff.io import atomic_write
from monai_segdiff.io import copy_atomic as _copy_atomic
from monai_segdiff.labelset import LABELS_FILE, LabelSet, SegmentMapping, extend_label_set, max_label, write_label
from monai_segdiff.slicer_io import is_seg_nrrd, segment_names
from monai_segdiff.validation import check_image_file, check_label_file

logger = logging.getLogger(__name__)

TAG = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
REPLACED = os.path.join(".segdiff", "replaced")
UPLOADS = os.path.join(".segdiff", "uploads")  # byte-exact label uploads, one per image and tag


def check_id(value: Any, what: str = "image id") -> str:
    """``value`` if it is a plain file name (the datastore builds paths from it); else HTTP 400."""
    text = value if isinstance(value, str) else ""
    if (
        not text
        or len(text) > 200
        or text.startswith(".")
        or ".." in text
        or any(c in text for c in "/\\:")
        or any(ord(c) < 32 for c in text)
    ):
        raise HTTPException(400, f"invalid {what} {value!r}: use a plain name (no '/', '\\', ':', '..' or leading '.')")
    return text


def check_tag(value: Any) -> str:
    """A label tag: letters, digits, ``_`` and ``-`` (it is a folder name under ``labels/``); else HTTP 400."""
    if not isinstance(value, str) or not TAG.match(value):
        raise HTTPException(400, f"invalid label tag {value!r}: use letters, digits, '_' or '-'")
    return value


def copy_atomic(src: str, dest: str) -> None:
    """Copy ``src`` over ``dest``: ``dest`` is always the old or the complete new file. The temporary
    file's name (``.<name>.<random>.tmp``) matches none of the datastore's file patterns."""
    _copy_atomic(src, dest, keep_suffix=False)


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file + rename (see `copy_atomic`)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text), keep_suffix=False)


def _status(e: InputError) -> HTTPException:
    return HTTPException(422, str(e))


class SegDiffLocalDatastore(LocalDatastore):
    """`LocalDatastore` with validated uploads, safe names and atomic writes (see the module doc).

    Args:
        datastore_path: the studies folder.
        image_channels: channels the served model takes (None: any).
        kwargs: `LocalDatastore` arguments (extensions, auto_reload, read_only).
    """

    def __init__(
        self,
        datastore_path: str,
        image_channels: Callable[[], int | None] = lambda: 1,
        **kwargs: Any,
    ) -> None:
        self.image_channels = image_channels
        config = kwargs.get("datastore_config", "datastore_v2.json")
        set_aside_if_corrupt(os.path.join(datastore_path, config), os.path.join(datastore_path, ".lock"))
        super().__init__(datastore_path, **kwargs)
        handler = getattr(self, "_handler", None)
        if handler is not None:  # our own writes rename into place: a "moved" event, not "modified"
            handler.on_moved = self._on_moved_event

    # -- events and the datastore file ----------------------------------------------------------
    def _on_moved_event(self, event) -> None:
        dest = os.fsdecode(getattr(event, "dest_path", b"") or b"")
        if dest == self._datastore_config_path:
            self._on_modify_event(SimpleNamespace(src_path=dest))

    def _update_datastore_file(self, lock: bool = True) -> None:
        def write() -> None:
            self._ignore_event_config = True
            text = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
            write_text_atomic(self._datastore_config_path, text)
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

        if lock:
            with FileLock(self._lock_file):
                write()
        else:
            write()

    # -- images ---------------------------------------------------------------------------------
    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        derived, image_ext = self._to_id(os.path.basename(image_filename))
        image_id = check_id(image_id or derived)
        try:
            check_image_file(image_filename, channels=self.image_channels())
        except InputError as e:
            raise _status(e) from None
        name = self._filename(image_id, image_ext)
        dest = os.path.realpath(os.path.join(self._datastore.image_path(), name))
        with FileLock(self._lock_file):
            old = self._datastore.objects.get(image_id)
            if old is not None and old.labels:
                raise HTTPException(
                    409,
                    f"image {image_id!r} exists and has labels ({', '.join(old.labels)}); upload under another id "
                    "(its labels would no longer fit a new image)",
                )
            copy_atomic(image_filename, dest)
            info = dict(image_info or {}, ts=int(time.time()), name=name)
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=image_ext))
            self._update_datastore_file(lock=False)
        logger.info(f"Added image {image_id} => {dest}")
        return image_id

    # -- labels ---------------------------------------------------------------------------------
    def label_set(self) -> LabelSet:
        """The studies folder's label set (``labels.json``)."""
        return LabelSet.load(self._datastore_path)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        """Store a submitted label in the studies' label set (see ``monai_segdiff.labelset``): values
        are mapped by segment name (``label_info["label_info"]``, 3D Slicer's list), new names extend
        the set, the byte-exact upload is kept under ``.segdiff/uploads/<tag>/``; what was done is
        stored in the label's info (``segdiff``) for the answer (``on_save_label``)."""
        tag = check_tag(label_tag or DefaultLabelTag.FINAL.value)
        image_id = check_id(image_id)
        obj = self._datastore.objects.get(image_id)
        image_path = self.get_image_uri(image_id) if obj is not None else ""
        if not image_path or not os.path.isfile(image_path):
            raise HTTPException(404, f"no image {image_id!r} in the datastore: upload the image first")
        label_info = dict(label_info or {})
        names = submitted_names(label_info, label_filename)
        try:
            image = check_image_file(image_path, channels=None)
            if names is not None and is_seg_nrrd(label_filename):  # values by segment name: all kept
                check_label_file(label_filename, image, None, {n: i + 1 for i, n in enumerate(names)})
                found = None
            else:
                found = check_label_file(label_filename, image)
        except InputError as e:
            raise _status(e) from None
        unnamed = [v for v in (found or {}).get("values", []) if names is not None and v > len(names)]
        if unnamed:
            raise HTTPException(
                422,
                f"label values {unnamed} are not named by label_info ({len(names)} segment(s): "
                f"{', '.join(names) or 'none'}): each value 1..n must be named",
            )
        if names is None and found is not None:
            self._check_values_in_set(found["values"])
        first = not os.path.isfile(os.path.join(self._datastore_path, LABELS_FILE))
        labels, mapping = extend_label_set(self._datastore_path, names, bootstrap=self._bootstrap(found) if first else ())

        _, upload_ext = self._to_id(os.path.basename(label_filename))
        label_ext = ".nii.gz" if is_seg_nrrd(label_filename) else upload_ext
        label_path = self._datastore.label_path(tag)
        name = self._filename(image_id, label_ext)
        dest = os.path.join(label_path, name)
        work = os.path.join(self._datastore_path, ".segdiff")
        with FileLock(self._lock_file):
            os.makedirs(label_path, exist_ok=True)
            os.makedirs(work, exist_ok=True)
            uploaded = self._keep_upload(label_filename, tag, self._filename(image_id, upload_ext), label_info)
            staged = os.path.join(work, f".staged-{uuid.uuid4().hex}{label_ext}")
            try:
                write_label(label_filename, staged, mapping.values if mapping else {}, work, labels.to_dict())
                stored = check_label_file(staged, image)
            except (InputError, OSError, RuntimeError, ValueError) as e:
                if os.path.exists(staged):
                    os.unlink(staged)
                raise HTTPException(422, f"cannot store the label: {str(e).splitlines()[0][:200]}") from None
            previous = self.get_label_uri(image_id, tag) if obj.labels.get(tag) else ""
            if previous and os.path.isfile(previous):
                if not stored["foreground_voxels"] and _foreground(previous, image):
                    os.unlink(staged)
                    raise HTTPException(
                        409,
                        f"the submitted {tag} label of {image_id!r} is empty and would replace a non-empty one; "
                        "delete the label first (DELETE /datastore/label) to clear it",
                    )
                self._keep_replaced(previous, tag)
            os.replace(staged, dest)
            if previous and os.path.realpath(previous) != os.path.realpath(dest) and os.path.isfile(previous):
                os.unlink(previous)  # same id, other format: the new file is the label now (kept above)
            answer = save_answer(labels, mapping, stored, uploaded, self._datastore_path)
            label_info.update(ts=int(time.time()), name=name, segdiff=answer)
            obj.labels[tag] = DataModel(info=label_info, ext=label_ext)
            self._update_datastore_file(lock=False)
        logger.info(f"Saved {tag} label of {image_id} => {dest} ({answer})")
        return image_id

    def _check_values_in_set(self, values: list[int]) -> None:
        """A label sent without segment names must use the label set's values (HTTP 422 otherwise);
        a folder without a label set yet takes ``label1..labelK`` (see ``_bootstrap``)."""
        labels = self.label_set()
        if not len(labels) and not os.path.isfile(os.path.join(self._datastore_path, LABELS_FILE)):
            return
        unknown = [v for v in values if v > len(labels)]
        if unknown:
            raise HTTPException(
                422,
                f"label values {unknown} are outside the label set {labels.to_dict()}; send label_info "
                "naming each segment (3D Slicer does) to add labels",
            )

    def _bootstrap(self, found: dict | None) -> list[str]:
        """Names of the values 1..K for a folder without ``labels.json``: ``label1..labelK`` up to the
        largest value already stored (or, without names, submitted), as the library reads such a folder."""
        top = max((found or {}).get("values") or [0]) if found and found.get("values") else 0
        stored = [lab for lab in (self.get_label_uri(i, DefaultLabelTag.FINAL) for i in self.get_labeled_images()) if lab]
        for path in stored:
            try:
                top = max(top, max_label(path))
            except InputError:
                continue
        return [f"label{i}" for i in range(1, top + 1)]

    def _keep_upload(self, src: str, tag: str, name: str, label_info: dict[str, Any]) -> str:
        """The byte-exact upload (and the request's ``label_info``) under ``.segdiff/uploads/<tag>/``."""
        folder = os.path.join(self._datastore_path, UPLOADS, tag)
        os.makedirs(folder, exist_ok=True)
        dest = os.path.join(folder, name)
        copy_atomic(src, dest)
        write_text_atomic(f"{dest}.json", json.dumps({"label_info": label_info, "ts": int(time.time())}, default=str))
        return os.path.relpath(dest, self._datastore_path)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        """Remove a label (``DELETE /datastore/label``, admins), keeping the removed version like a replaced one."""
        path = self.get_label_uri(label_id, label_tag)
        if path and os.path.isfile(path):
            self._keep_replaced(path, label_tag)
        super().remove_label(label_id, label_tag)

    def _keep_replaced(self, path: str, tag: str) -> None:
        """Keep the version a new label replaces (one per image and tag) under ``.segdiff/replaced/``."""
        folder = os.path.join(self._datastore_path, REPLACED, tag)
        os.makedirs(folder, exist_ok=True)
        copy_atomic(path, os.path.join(folder, os.path.basename(path)))


def submitted_names(label_info: dict[str, Any], label_file: str) -> list[str] | None:
    """The segment names of a submitted label, for its values 1..n: 3D Slicer's ``label_info`` list
    (exported in that order), a ``.seg.nrrd``'s own segment names, or None (no names sent)."""
    given = label_info.get("label_info")
    if isinstance(given, list) and given:
        return [str(e.get("name", "")) if isinstance(e, dict) else str(e) for e in given]
    if is_seg_nrrd(label_file):
        try:
            return segment_names(label_file)
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
    return None


def save_answer(labels: LabelSet, mapping: SegmentMapping | None, stored: dict, upload: str, studies: str) -> dict:
    """What a save did, for the client (3D Slicer shows the answer): the label set, the value each
    submitted segment got, names added to the set or dropped, warnings."""
    answer: dict[str, Any] = {"label_set": labels.to_dict(), "upload_kept": upload}
    if mapping is not None:
        answer["segments"] = {mapping.names[k]: v for k, v in mapping.values.items() if v}
        answer["remapped"] = {str(k): v for k, v in mapping.changes.items()}
        if mapping.added:
            answer["added"] = mapping.added
        if mapping.dropped:
            answer["dropped"] = sorted(mapping.dropped)
    warnings = []
    if mapping is not None and mapping.dropped:
        warnings.append(
            f"segment(s) {', '.join(sorted(mapping.dropped))} not stored: 'uncertain' is the uncertainty model's view, "
            "not a label"
        )
    if not stored["foreground_voxels"]:
        warnings.append("the stored label is empty (no foreground voxel): the image counts as showing none of the labels")
    if warnings:
        answer["warnings"] = warnings
    return answer


def _foreground(path: str, image) -> int:
    """Foreground voxels of a stored label (0 if it cannot be read: nothing of value to protect)."""
    try:
        return check_label_file(path, image)["foreground_voxels"]
    except InputError:
        return 0


def set_aside_if_corrupt(path: str, lock_file: str) -> None:
    """Move an unparseable datastore file aside (``<name>.corrupt-<time>``): the datastore is then
    rebuilt from the files on disk (labels are files; image infos such as scores are recomputed)."""
    if not os.path.isfile(path):
        return
    with FileLock(lock_file):
        try:
            with open(path) as f:
                LocalDatastoreModel.model_validate_json(f.read())
            return
        except (OSError, ValueError) as e:
            aside = f"{path}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
            logger.error(f"datastore file {path} is unreadable ({str(e).splitlines()[0][:200]}); moved to {aside}")
            try:
                os.replace(path, aside)
            except FileNotFoundError:
                pass
