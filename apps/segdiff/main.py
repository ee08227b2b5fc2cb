"""MONAI Label app for diffusion segmentation with uncertainty (monai-segdiff).

    monailabel start_server --app apps/segdiff --studies sample-data/phantoms [--conf key value ...]

Tasks (built in ``lib/configs/segdiff.py`` from the ``--conf`` options listed there):

* infer ``segdiff``: label map + per-label uncertainty statistics; ``segdiff_uncertainty``: the
  "uncertain" segment (or the float map with ``{"output_map": true}``), from the same cached ensemble;
* train ``segdiff_train``: fine-tune / train on the final labels, publish the best model;
* scoring ``segdiff_uncertainty``: case scores of unlabeled images for the strategy of the same name,
  next to MONAI Label's ``random`` and ``first``.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading

import monai_segdiff
from fastapi import HTTPException
from lib.auth import answer_refused_logins, close_open_routes, fix_token_validation
from lib.configs import SegDiffTaskConfig
from lib.datastore import SegDiffDICOMWebDatastore
from lib.labels import present_values, seg_label_info
from lib.localstore import SegDiffLocalDatastore, check_tag
from lib.model import SegDiffAppError
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.utils.async_tasks.utils import tasks as background_tasks

from monai_segdiff.config import NETWORKS
from monai_segdiff.errors import InputError
from monai_segdiff.validation import check_image_file

logger = logging.getLogger(__name__)

MIN_TRAIN_CASES = 2  # one final label to train on and one held out to validate before publishing
TRAIN_NUMBERS = {  # option: (lowest allowed, highest allowed or None, lowest excluded)
    "max_epochs": (0, None, False), "max_minutes": (0, None, False), "iterations_per_epoch": (0, None, False),
    "train_batch_size": (1, None, False), "learning_rate": (0, None, True), "val_split": (0, 0.9, False),
}


def check_train_request(request: dict) -> None:
    """HTTP 422 for train options the trainer cannot use (it would fail, or silently fall back to a default)."""
    network = request.get("network")
    if network not in (None, "") and network not in NETWORKS:
        raise HTTPException(422, f"unknown network {network!r}; use one of {', '.join(NETWORKS)}")
    for key, (low, high, open_low) in TRAIN_NUMBERS.items():
        value = request.get(key)
        if value is None or value == "":
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = float("nan")
        if not (number > low if open_low else number >= low) or (high is not None and number > high):
            limit = (f"> {low}" if open_low else f">= {low}") + (f" and <= {high}" if high is not None else "")
            raise HTTPException(422, f"{key} must be a number {limit}, got {value!r}")


class SegDiffApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        if settings.MONAI_LABEL_AUTH_ENABLE:  # MONAI Label 0.8.5's gaps (lib/auth.py)
            fix_token_validation()  # else every token is refused (PyJWT 2)
            close_open_routes()  # POST /reload needs no token
            answer_refused_logins()  # a wrong password was a bare 500
        self.model_dir = os.path.join(app_dir, "model")
        self.task = SegDiffTaskConfig()
        self.task.init("segdiff", self.model_dir, conf, None, studies=studies)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name=f"MONAI Label - SegDiff ({monai_segdiff.__version__})",
            description="Conditional diffusion segmentation with uncertainty and active learning",
            version=monai_segdiff.__version__,
        )

    # -- tasks ----------------------------------------------------------------------------------
    def init_infers(self):
        return self.task.infer()

    def init_trainers(self):
        return {f"{self.task.name}_train": self.task.trainer()}

    def init_strategies(self):
        return {**self.task.strategy(), "random": Random(), "first": First()}

    def init_scoring_methods(self):
        return self.task.scoring_method()

    def init_datastore(self):
        """A local studies folder: MONAI Label's datastore with validated uploads, safe names and atomic
        writes (``lib/localstore.py``); remote datastores as MONAI Label builds them."""
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        return SegDiffLocalDatastore(
            self.studies,
            image_channels=lambda: getattr(self.task.model.config(), "image_channels", None),
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def init_remote_datastore(self):
        datastore = super().init_remote_datastore()
        if type(datastore) is DICOMWebDatastore:  # --studies http://.../dicom-web
            datastore = SegDiffDICOMWebDatastore.adopt(datastore, self.task.model.label_names)
        return datastore

    # -- behaviour on top of MONAILabelApp ------------------------------------------------------
    def info(self):
        meta = super().info()
        # Slicer creates one segment per entry of "labels" (foreground only: no "background", no
        # "uncertain"); submitted labels are stored by segment name whatever the order.
        # The studies' label set first (the annotator draws those), then what the model segments besides.
        coverage = self.task.model.coverage()
        wanted = coverage["label_set"]
        meta["labels"] = wanted + [n for n in coverage["model_labels"] if n.lower() not in {w.lower() for w in wanted}]
        meta["segdiff"] = coverage
        return meta

    def infer(self, request, datastore=None):
        """MONAI Label answers any exception with a bare 500; map ours to clear 4xx/5xx answers."""
        model = request.get("model")
        if model and model not in self._infers:
            raise HTTPException(404, f"no model {model!r}; available: {', '.join(self._infers)}")
        image = request.get("image")
        if request.get("save_label") and str(request.get("label_tag", "")) == DefaultLabelTag.FINAL.value:
            raise HTTPException(409, "an infer result is never saved as the final label (label_tag 'final')")
        if request.get("label_tag") is not None:
            check_tag(request.get("label_tag"))
        if isinstance(image, str) and image and not self._readable_path(image):
            try:
                found = (datastore or self.datastore()).get_image_uri(image)
            except (IndexError, KeyError):  # the DICOMweb datastore's answer to an unknown series
                found = None
            if not found:
                raise HTTPException(404, f"image {image!r} not found in the datastore")
        try:
            result = super().infer(request, datastore)
        except SegDiffAppError as e:
            raise HTTPException(e.status_code, e.msg) from e
        except MONAILabelException as e:
            raise HTTPException(400 if e.error == MONAILabelError.INVALID_INPUT else 500, e.msg) from e
        self._describe_segments(request.get("label_info"), result)
        return result

    def _readable_path(self, image: str) -> bool:
        """May infer read ``image`` as a file path? In the server only the file MONAI Label's infer
        endpoint wrote from the request's upload (``<tmp>/tmp*``) or a session's image: any other
        value must be a datastore id (no reading server files by path, e.g. ``../../etc/passwd``).
        Outside the server (``monailabel.interfaces.utils.app -m infer``) any existing path."""
        if not os.path.isfile(image):
            return False
        if not self._server_mode:
            return True
        path = os.path.realpath(image)
        uploads = os.path.realpath(tempfile.gettempdir())
        if os.path.dirname(path) == uploads and os.path.basename(path).startswith("tmp"):
            return True
        sessions = self.sessions()
        root = os.path.realpath(sessions.store_path) if sessions is not None else None
        return bool(root) and os.path.commonpath([path, root]) == root

    def bundle_path(self, model):
        """MONAI Label 0.8.5 calls this in the request thread just before it starts a train subprocess
        (``AsyncTask.run``): the place to refuse a training that cannot work with a 4xx answer instead
        of a background task that fails later. It passes only the model name; the request's options
        are read from the caller's ``request`` (left unchecked here if MONAI Label's code differs)."""
        if model in self._trainers:
            labelled = len(self.datastore().get_labeled_images())
            if labelled < MIN_TRAIN_CASES:
                raise HTTPException(
                    422,
                    f"training needs at least {MIN_TRAIN_CASES} images with a final label (one is held out to "
                    f"check the model before it replaces the served one); the datastore has {labelled}",
                )
            caller = sys._getframe(1)
            request = caller.f_locals.get("request") if caller.f_code.co_name == "run" else None
            if isinstance(request, dict):
                check_train_request(request)
        return super().bundle_path(model)

    @staticmethod
    def _describe_segments(label_info, result: dict) -> None:
        """``output=dicom_seg``: MONAI Label's infer endpoint writes the DICOM SEG from the request's
        ``label_info`` list (this very object) and names the i-th label value present in the result after
        its i-th entry; rewrite the list in place to one entry per value present, named by the model."""
        params = result.get("params") or {}
        if not isinstance(label_info, list) or not label_info or params.get("output") == "uncertainty_map":
            return
        try:
            values = present_values(result["file"])
        except Exception as e:  # no readable result file: the endpoint reports it
            logger.warning(f"segdiff: could not read the result's label values: {e}")
            return
        label_info[:] = seg_label_info(values, params.get("label_names") or {}, label_info)

    def sessions(self):
        """MONAI Label's sessions (Slicer uploads a local volume as one), refusing an uploaded image that
        inference could not read whole (e.g. a truncated NIfTI) with a 422 instead of storing it."""
        sessions = super().sessions()
        if sessions is not None and not getattr(sessions, "segdiff_checked", False):
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

    def on_init_complete(self):
        super().on_init_complete()
        threading.Thread(target=self._warm_up, name="segdiff-warm-up", daemon=True).start()

    def _warm_up(self):
        """ITK loads its IO modules on the first write (~3 s): pay that now, not in the first infer."""
        import tempfile

        import numpy as np
        from monailabel.transform.writer import write_itk

        with tempfile.TemporaryDirectory() as tmp:
            write_itk(np.zeros((2, 2, 2), np.uint8), os.path.join(tmp, "warm.nii.gz"), np.eye(4), None, False)
        if self.task.preload and self.task.model.exists():
            try:
                self.task.model.segmenter()
                logger.info("segdiff: model preloaded")
            except SegDiffAppError as e:
                logger.warning(f"segdiff: preload failed: {e.msg}")

    def async_scoring(self, method, params=None):
        """Start the scoring subprocess only when it has work: MONAI Label asks for it at start-up,
        after every next sample and after training; an idle run still costs seconds of CPU."""
        if method is None and not (params and params.get("force")):
            running = [t for t in background_tasks("scoring") if t.get("status") in ("SUBMITTED", "RUNNING")]
            if running:
                return {}
            scoring = self._scoring_methods.get(f"{self.task.name}_uncertainty")
            if scoring is not None and not scoring.stale_images(self.datastore()):
                return {}
        return super().async_scoring(method, params)

    def on_save_label(self, image_id: str, label_id: str):
        """The answer to Submit Label (3D Slicer shows it): what the datastore did with the label --
        the label set, the value of each segment, names added or dropped, warnings (``lib/localstore.py``);
        on DICOMweb the remapping to the model's labels done before the upload (``lib/datastore.py``)."""
        super().on_save_label(image_id, label_id)
        info = self.datastore().get_label_info(label_id, DefaultLabelTag.FINAL)
        if not isinstance(info, dict):
            return {}
        if "segdiff" in info:
            return info["segdiff"]
        if "segdiff_remapped" in info:
            return {"remapped": info["segdiff_remapped"]}
        return {}
