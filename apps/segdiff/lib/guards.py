"""Checks on requests before MONAI Label acts on them: clear 4xx answers instead of a bare 500, and no
file the request should not reach."""

from __future__ import annotations

import logging
import os
import re
import tempfile
from typing import Any

from fastapi import HTTPException
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.utils.async_tasks.task import AsyncTask

from monai_segdiff.retrain import RetrainOptions
from monai_segdiff.errors import InputError
from monai_segdiff.validation import check_image_file

from .labels import present_values, seg_label_info

logger = logging.getLogger(__name__)

TAG = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


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


def check_train_request(request: dict) -> None:
    """HTTP 422 for train options the trainer cannot use: the library's one check of them."""
    try:
        RetrainOptions.from_request(request)
    except InputError as e:
        raise HTTPException(422, str(e)) from None


def refuse_bad_train_options() -> None:
    """Check every train request's options before MONAI Label starts its subprocess. MONAI Label 0.8.5
    has no app hook that sees the request in the request thread (``AsyncTask.run`` merges the endpoint's
    ``params`` and starts the subprocess; the trainer would only fail later, in the background), so its
    ``AsyncTask.run`` is wrapped, once, as ``lib/auth.py`` wraps its token checks."""
    original = AsyncTask.run
    if getattr(original, "segdiff_checked", False):
        return

    def run(method, request=None, params=None, force_sync=False, enqueue=False):
        if method == "train":
            check_train_request({**(request or {}), **(params or {})})
        return original(method, request=request, params=params, force_sync=force_sync, enqueue=enqueue)

    run.segdiff_checked = True
    AsyncTask.run = staticmethod(run)


def readable_path(image: str, server_mode: bool, sessions_root: str | None) -> bool:
    """May infer read ``image`` as a file path? In the server only the file MONAI Label's infer endpoint
    wrote from the request's upload (``<tmp>/tmp*``) or a session's image: any other value must be a
    datastore id (no reading server files by path, e.g. ``../../etc/passwd``). Outside the server
    (``monailabel.interfaces.utils.app -m infer``) any existing path."""
    if not os.path.isfile(image):
        return False
    if not server_mode:
        return True
    path = os.path.realpath(image)
    uploads = os.path.realpath(tempfile.gettempdir())
    if os.path.dirname(path) == uploads and os.path.basename(path).startswith("tmp"):
        return True
    root = os.path.realpath(sessions_root) if sessions_root else None
    return bool(root) and os.path.commonpath([path, root]) == root


def check_infer_request(request: dict[str, Any], models: dict, datastore: Datastore, server_mode: bool,
                        sessions_root: str | None) -> None:
    """404 for an unknown model or image, 409 for saving a result as the final label, 400 for a bad tag."""
    model = request.get("model")
    if model and model not in models:
        raise HTTPException(404, f"no model {model!r}; available: {', '.join(models)}")
    if request.get("save_label") and str(request.get("label_tag", "")) == DefaultLabelTag.FINAL.value:
        raise HTTPException(409, "an infer result is never saved as the final label (label_tag 'final')")
    if request.get("label_tag") is not None:
        check_tag(request.get("label_tag"))
    image = request.get("image")
    if isinstance(image, str) and image and not readable_path(image, server_mode, sessions_root):
        try:
            found = datastore.get_image_uri(image)
        except (IndexError, KeyError):  # the DICOMweb datastore's answer to an unknown series
            found = None
        if not found:
            raise HTTPException(404, f"image {image!r} not found in the datastore")


def describe_segments(label_info, result: dict) -> None:
    """``output=dicom_seg``: MONAI Label's infer endpoint writes the DICOM SEG from the request's
    ``label_info`` list (this very object) and names the i-th label value present in the result after its
    i-th entry; rewrite the list in place to one entry per value present, named by the model."""
    params = result.get("params") or {}
    if not isinstance(label_info, list) or not label_info or params.get("output") == "uncertainty_map":
        return
    try:
        values = present_values(result["file"])
    except Exception as e:  # no readable result file: the endpoint reports it
        logger.warning(f"segdiff: could not read the result's label values: {e}")
        return
    label_info[:] = seg_label_info(values, params.get("label_names") or {}, label_info)


def checked_sessions(sessions):
    """MONAI Label's sessions (Slicer uploads a local volume as one), refusing an uploaded image that
    inference could not read whole (e.g. a truncated NIfTI) with a 422 instead of storing it."""
    if getattr(sessions, "segdiff_checked", False):
        return sessions
    add_session = sessions.add_session

    def checked(image: str, expiry: int = 0, uncompress: bool = False):
        if not uncompress and os.path.isfile(image):
            try:
                check_image_file(image, channels=None)
            except InputError as e:
                raise HTTPException(422, f"session image refused: {e}") from None
        return add_session(image, expiry, uncompress)

    sessions.add_session, sessions.segdiff_checked = checked, True
    return sessions
