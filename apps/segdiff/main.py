"""MONAI Label app for diffusion segmentation with uncertainty (monai-segdiff).

    monailabel start_server --app apps/segdiff --studies sample-data/phantoms [--conf key value ...]

Tasks (built in ``lib/configs/segdiff.py`` from the ``--conf`` options listed there):

* infer ``segdiff``: label map + per-label uncertainty statistics; ``segdiff_uncertainty``: the
  "uncertain" segment (or the float map with ``{"output_map": true}``), from the same cached ensemble;
* train ``segdiff_train``: fine-tune / train on the final labels, publish the best model;
* scoring ``segdiff_uncertainty``: case and per-slice scores of unlabeled images for the strategies
  ``segdiff_uncertainty`` (the most uncertain image) and ``segdiff_slices`` (its most uncertain slices, for
  partial annotation), next to MONAI Label's ``random`` and ``first``.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading

import monai_segdiff
import numpy as np
from fastapi import HTTPException
from lib.auth import answer_refused_logins, close_open_routes, fix_token_validation
from lib.configs import SegDiffTaskConfig
from lib.datastore import SegDiffDICOMWebDatastore
from lib.guards import check_infer_request, checked_sessions, describe_segments, refuse_bad_train_options
from lib.localstore import SegDiffLocalDatastore
from lib.model import SegDiffAppError
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.transform.writer import write_itk
from monailabel.utils.async_tasks.utils import tasks as background_tasks

logger = logging.getLogger(__name__)

MIN_TRAIN_CASES = 2  # one final label to train on and one held out to validate before publishing


class SegDiffApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        if settings.MONAI_LABEL_AUTH_ENABLE:  # MONAI Label 0.8.5's gaps (lib/auth.py)
            fix_token_validation()  # else every token is refused (PyJWT 2)
            close_open_routes()  # POST /reload needs no token
            answer_refused_logins()  # a wrong password was a bare 500
        refuse_bad_train_options()  # 422 before a train subprocess starts (lib/guards.py)
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
            model = self.task.model
            datastore = SegDiffDICOMWebDatastore.adopt(
                datastore, self.task.label_folder, lambda: [n for n, v in model.label_names().items() if v > 0])
        return datastore

    # -- behaviour on top of MONAILabelApp ------------------------------------------------------
    def info(self):
        meta = super().info()
        # Slicer creates one segment per entry of "labels" (no "uncertain"); submitted labels are stored by segment name whatever the order.
        # The studies' label set first (the annotator draws those), then what the model segments besides.
        coverage = self.task.model.coverage()
        wanted = coverage["label_set"]
        meta["labels"] = wanted + [n for n in coverage["model_labels"] if n.lower() not in {w.lower() for w in wanted}]
        # last, a "background" segment: Slicer's click section (multi-label mode) sends the points of each
        # listed segment, so background clicks are the points placed on it (DeepEdit's convention);
        # Submit Label drops it, as it drops Slicer's scribble segments
        meta["labels"] = [n for n in meta["labels"] if n.lower() != "background"] + ["background"]
        meta["segdiff"] = coverage
        return meta

    def infer(self, request, datastore=None):
        """MONAI Label answers any exception with a bare 500; map ours to clear 4xx/5xx answers."""
        sessions = self.sessions() if self._server_mode else None
        check_infer_request(request, self._infers, datastore or self.datastore(), self._server_mode,
                            sessions.store_path if sessions is not None else None)
        try:
            result = super().infer(request, datastore)
        except SegDiffAppError as e:
            raise HTTPException(e.status_code, e.msg) from e
        except MONAILabelException as e:
            raise HTTPException(400 if e.error == MONAILabelError.INVALID_INPUT else 500, e.msg) from e
        describe_segments(request.get("label_info"), result)
        return result

    def bundle_path(self, model):
        """MONAI Label 0.8.5 calls this in the request thread just before it starts a train subprocess
        (``AsyncTask.run``): the place to refuse a training that cannot work with a 4xx answer instead
        of a background task that fails later (the options are checked by ``refuse_bad_train_options``)."""
        if model in self._trainers:
            labelled = len(self.datastore().get_labeled_images())
            if labelled < MIN_TRAIN_CASES:
                raise HTTPException(
                    422,
                    f"training needs at least {MIN_TRAIN_CASES} images with a final label (one is held out to "
                    f"check the model before it replaces the served one); the datastore has {labelled}",
                )
        return super().bundle_path(model)

    def sessions(self):
        """MONAI Label's sessions, refusing an uploaded image that cannot be read whole (422)."""
        sessions = super().sessions()
        return checked_sessions(sessions) if sessions is not None else None

    def on_init_complete(self):
        super().on_init_complete()
        threading.Thread(target=self._warm_up, name="segdiff-warm-up", daemon=True).start()

    def _warm_up(self):
        """ITK loads its IO modules on the first write (~3 s): pay that now, not in the first infer."""

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
