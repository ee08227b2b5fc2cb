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
import threading

import monai_segdiff
from fastapi import HTTPException
from lib.configs import SegDiffTaskConfig
from lib.labels import remap_label_file, value_mapping
from lib.model import SegDiffAppError
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.utils.async_tasks.utils import tasks as background_tasks

logger = logging.getLogger(__name__)


class SegDiffApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
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

    # -- behaviour on top of MONAILabelApp ------------------------------------------------------
    def info(self):
        meta = super().info()
        # Slicer creates one segment per entry of "labels" and exports segments in that order:
        # the model's foreground labels only (no "background", no "uncertain").
        names = self.task.model.label_names()
        meta["labels"] = [n for n, v in sorted(names.items(), key=lambda kv: kv[1]) if v > 0]
        return meta

    def infer(self, request, datastore=None):
        """MONAI Label answers any exception with a bare 500; map ours to clear 4xx/5xx answers."""
        model = request.get("model")
        if model and model not in self._infers:
            raise HTTPException(404, f"no model {model!r}; available: {', '.join(self._infers)}")
        image = request.get("image")
        if isinstance(image, str) and image and not os.path.exists(image):
            if not (datastore or self.datastore()).get_image_uri(image):
                raise HTTPException(404, f"image {image!r} not found in the datastore")
        try:
            return super().infer(request, datastore)
        except SegDiffAppError as e:
            raise HTTPException(e.status_code, e.msg) from e
        except MONAILabelException as e:
            raise HTTPException(400 if e.error == MONAILabelError.INVALID_INPUT else 500, e.msg) from e

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
        """Make a submitted final label's values mean the model's labels (by segment name)."""
        super().on_save_label(image_id, label_id)
        ds = self.datastore()
        info = ds.get_label_info(label_id, DefaultLabelTag.FINAL)
        label_info = info.get("label_info") if isinstance(info, dict) else None
        names = self.task.model.label_names()
        if not label_info or not names or "segdiff_remapped" in info:
            return {}
        path = ds.get_label_uri(label_id, DefaultLabelTag.FINAL)
        try:
            changes = remap_label_file(path, value_mapping(label_info, names))
        except Exception as e:  # an unreadable label is the trainer's problem to report, not the save's
            logger.warning(f"segdiff: could not check label values of {path}: {e}")
            return {}
        changes = {str(k): v for k, v in (changes or {}).items()}
        ds.update_label_info(label_id, DefaultLabelTag.FINAL, {"segdiff_remapped": changes})
        if changes:
            logger.info(f"segdiff: {label_id}: label values remapped by segment name {changes}")
        return {"remapped": changes}

