"""The studies folder as MONAI Label's `LocalDatastore`, hardened for a server that takes uploads from
anywhere and runs for days.

* Image ids and label tags are file names, never paths: ``..``, ``/``, ``\\`` or a leading ``.`` -> 400.
* Uploads are read the way training and inference read them before anything is stored: an image that
  is not an image, truncated, 4D, too large or all NaN -> 422; a label whose grid (shape or affine) is
  not its image's, whose values are not whole numbers or are not named by the request's ``label_info``
  -> 422; a label for an image that does not exist -> 404. A rejected upload never touches the stored
  files.
* A label is stored in the studies' label set (``labels.json``, ``monai_segdiff.labelstore``): segments
  are mapped by name, a new name extends the set, only the ``uncertain`` segment is dropped, and the
  byte-exact upload is kept as ``<studies>/.segdiff/uploads/<tag>/<file>``.
* A user's label is never lost: an empty label does not replace a non-empty one (409), an image that
  has labels is not replaced by another upload under its id (409), and the version a new label replaces
  (or an admin's ``DELETE`` removes) is kept as ``<studies>/.segdiff/replaced/<tag>/<file>``.
* Files are written atomically (temporary file in the same folder + rename): no reader -- the server,
  a training or scoring subprocess, a crash -- ever sees half a label, image or ``datastore_v2.json``.
  An unparseable ``datastore_v2.json`` is set aside and rebuilt from the files (``recovery.py``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from types import SimpleNamespace
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore
from monailabel.interfaces.datastore import DefaultLabelTag

from monai_segdiff import labelstore as store
from monai_segdiff.atomic import atomic_write
from monai_segdiff.atomic import copy_atomic as _copy_atomic
from monai_segdiff.data import ANNOTATE_REQUEST, ANNOTATED_FILE, annotated_slices, record_annotated_slices
from monai_segdiff.labelset import LABELS_FILE, LabelSet, extend_label_set
from monai_segdiff.labelstore import LabelConflict
from monai_segdiff.slicer_io import is_seg_nrrd
from monai_segdiff.errors import InputError
from monai_segdiff.validation import check_image_file

from .guards import check_id, check_tag
from .recovery import set_aside_if_corrupt

logger = logging.getLogger(__name__)



def copy_atomic(src: str, dest: str) -> None:
    """Copy ``src`` over ``dest``: ``dest`` is always the old or the complete new file. The temporary
    file's name (``.<name>.<random>.tmp``) matches none of the datastore's file patterns."""
    _copy_atomic(src, dest, keep_suffix=False)


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file + rename (see `copy_atomic`)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text), keep_suffix=False)


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
            raise HTTPException(422, str(e)) from None
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
        """Store a submitted label in the studies' label set (``monai_segdiff.labelstore``): values are
        mapped by segment name (``label_info["label_info"]``, 3D Slicer's list), new names extend the set,
        the byte-exact upload is kept under ``.segdiff/uploads/<tag>/``; what was done is stored in the
        label's info (``segdiff``) for the answer (``on_save_label``)."""
        tag = check_tag(label_tag or DefaultLabelTag.FINAL.value)
        image_id = check_id(image_id)
        obj = self._datastore.objects.get(image_id)
        image_path = self.get_image_uri(image_id) if obj is not None else ""
        if not image_path or not os.path.isfile(image_path):
            raise HTTPException(404, f"no image {image_id!r} in the datastore: upload the image first")
        label_info = dict(label_info or {})
        studies = self._datastore_path
        _, upload_ext = self._to_id(os.path.basename(label_filename))
        label_ext = ".nii.gz" if is_seg_nrrd(label_filename) else upload_ext
        name = self._filename(image_id, label_ext)
        dest = os.path.join(self._datastore.label_path(tag), name)
        try:
            names = store.submitted_names(label_info, label_filename)
            image = check_image_file(image_path, channels=None)
            found = store.check_submission(label_filename, image, names)
            if names is None:
                store.check_values_in_set(studies, found["values"])
            first = not os.path.isfile(os.path.join(studies, LABELS_FILE))
            bootstrap = store.bootstrap_names(found if names is None else None, self._final_labels()) if first else ()
            labels, mapping = extend_label_set(studies, names, bootstrap=bootstrap)
            with FileLock(self._lock_file):
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                uploaded = store.keep_upload(studies, label_filename, tag, self._filename(image_id, upload_ext),
                                             label_info)
                staged, stored = store.stage_label(label_filename, image, studies, mapping, labels, label_ext)
                previous = self.get_label_uri(image_id, tag) if obj.labels.get(tag) else ""
                if previous and os.path.isfile(previous):
                    try:
                        store.refuse_empty_over(stored, previous, image, f"{tag} label of {image_id!r}")
                    except LabelConflict:
                        os.unlink(staged)
                        raise
                    store.keep_replaced(studies, previous, tag)
                os.replace(staged, dest)
                if previous and os.path.realpath(previous) != os.path.realpath(dest) and os.path.isfile(previous):
                    os.unlink(previous)  # same id, other format: the new file is the label now (kept above)
                answer = store.save_answer(labels, mapping, stored, uploaded)
                if tag == DefaultLabelTag.FINAL.value:
                    partial = self._partial(studies, image_id, obj.image.info.pop(ANNOTATE_REQUEST, None))
                    if partial:
                        answer["annotated_slices"] = partial
                label_info.update(ts=int(time.time()), name=name, segdiff=answer)
                obj.labels[tag] = DataModel(info=label_info, ext=label_ext)
                self._update_datastore_file(lock=False)
        except LabelConflict as e:
            raise HTTPException(409, str(e)) from None
        except InputError as e:
            raise HTTPException(422, str(e)) from None
        logger.info(f"Saved {tag} label of {image_id} => {dest} ({answer})")
        return image_id

    @staticmethod
    def _partial(studies: str, image_id: str, request) -> dict | None:
        """A final label submitted while ``segdiff_slices``'s request for it is live is a partial label: its
        slices are recorded (``annotated_slices.json``). Without a live request an earlier record stays
        (a resubmitted partial label must not turn its unannotated slices into background); the answer
        says so either way."""
        note = ("a partial label: only these slices (and slices where a structure was drawn) are learnt from; "
                "the rest of the label counts as unannotated, not background")
        if isinstance(request, dict) and float(request.get("until", math.inf)) >= time.time():
            record_annotated_slices(studies, image_id, request["axis"], request["slices"])
            return {"axis": request["axis"], "slices": request["slices"], "note": note}
        earlier = annotated_slices(studies).get(image_id)
        if earlier:
            return {**earlier, "note": note + f" (recorded earlier; to count this label whole, remove {image_id!r} "
                    f"from labels/final/{ANNOTATED_FILE})"}
        return None

    def _final_labels(self) -> list[str]:
        """The stored final label files."""
        found = (self.get_label_uri(i, DefaultLabelTag.FINAL) for i in self.get_labeled_images())
        return [path for path in found if path]

    def remove_label(self, label_id: str, label_tag: str) -> None:
        """Remove a label (``DELETE /datastore/label``, admins), keeping the removed version like a replaced one."""
        path = self.get_label_uri(label_id, label_tag)
        if path and os.path.isfile(path):
            store.keep_replaced(self._datastore_path, path, label_tag)
        super().remove_label(label_id, label_tag)
