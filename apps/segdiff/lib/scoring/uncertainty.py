"""Scoring method ``segdiff_uncertainty``: a fast ensemble on every unlabeled image whose score is
stale, writing ``segdiff_uncertainty`` (the library's case score), ``segdiff_slice_scores`` (the mean
uncertainty of each slice of a volume, for ``segdiff_slices``) and ``segdiff_uncertainty_ts`` (the
model file's mtime) into the image info. MONAI Label runs it in a subprocess at start-up, after
training and on ``POST /scoring/segdiff_uncertainty``; the active-learning strategy reads the scores.

Interactive requests come first: the scoring subprocess runs at the lowest CPU priority (nice 19)
on one torch thread, and before each image waits while an infer of the same model holds its
`BusyMarker` (``infers.segdiff.busy_marker``), so scoring never slows an Auto Segmentation by more
than a few per cent (BENCHMARKS.md, session 13).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod

from monai_segdiff.busy import lower_priority
from monai_segdiff.errors import InputError
from monai_segdiff.values import finite, flag

from ..infers.options import busy_marker
from ..model import SegDiffModel

logger = logging.getLogger(__name__)

SCORE_KEY = "segdiff_uncertainty"
TS_KEY = "segdiff_uncertainty_ts"
SLICES_KEY = "segdiff_slice_scores"  # per input slice: {"axis", "slices", "scores"} (partial annotation)


class UncertaintyScoring(ScoringMethod):
    """Case uncertainty of unlabeled images for active learning.

    Args:
        model: the served model file.
        samples: ensemble size for scoring (smaller than for interactive infer: ranking needs less).
        steps: sampling steps for scoring (one view: no test-time flips, whatever the model stores).
        max_rounds: rescoring rounds when the model file changes while scoring runs.
        background: yield to interactive infers: lower this process's priority (nice 19, one torch
            thread; MONAI Label runs scoring in a subprocess of its own) and wait between images while
            an infer runs. False: run at full speed (e.g. scoring called inside a server process).

    Request options: ``samples``, ``steps``, ``device``, ``force`` (rescore every unlabeled image).
    """

    def __init__(
        self, model: SegDiffModel, samples: int = 3, steps: int = 2, max_rounds: int = 3, background: bool = True
    ):
        super().__init__(f"Case uncertainty of unlabeled images ({samples} samples x {steps} steps)")
        self.model, self.samples, self.steps, self.max_rounds = model, int(samples), int(steps), int(max_rounds)
        self.background = bool(background)
        self._lowered: dict | None = None

    def info(self) -> dict[str, Any]:
        return {"description": self.description, "keys": [SCORE_KEY, TS_KEY]}

    def stale_images(self, datastore: Datastore, ts: float | None = None) -> list[str]:
        """Unlabeled images whose score was not computed with the current model file."""
        ts = self.model.ts() if ts is None else ts
        if ts is None:
            return []
        return [i for i in datastore.get_unlabeled_images() if datastore.get_image_info(i).get(TS_KEY) != ts]

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        start = time.time()
        samples = int(request.get("samples") or self.samples)
        steps = int(request.get("steps") or self.steps)
        device = request.get("device") or None
        device = device[0] if isinstance(device, list) else device
        force = flag(request.get("force"))
        if self.background and self._lowered is None:  # once per process: it cannot be undone
            self._lowered = lower_priority()
            logger.info(f"segdiff_uncertainty: background priority {self._lowered}")
        marker = busy_marker(self.model)
        scored, failed, rounds, waited = {}, {}, 0, 0.0
        for rounds in range(1, self.max_rounds + 1):
            ts = self.model.ts()
            if ts is None:
                logger.info("segdiff_uncertainty: no model file yet; nothing to score")
                return {"scored": 0, "skipped": "no model"}
            todo = list(datastore.get_unlabeled_images()) if force and rounds == 1 else self.stale_images(datastore, ts)
            if not todo:
                break
            seg, _ = self.model.segmenter(samples, steps, device, tta_flips=1)  # no mirror views: ranking needs less
            logger.info(f"segdiff_uncertainty: scoring {len(todo)} image(s) with {samples} samples x {steps} steps")
            changed = False
            for image_id in todo:
                if self.background:  # an Auto Segmentation is running: let it have the CPU
                    pause = marker.wait_until_idle()
                    if pause:
                        waited += pause
                        logger.info(f"segdiff_uncertainty: waited {pause:.1f}s for interactive infer")
                if self.model.ts() != ts:  # a new model was published: score again with it
                    changed = True
                    break
                t0 = time.time()
                info: dict[str, Any] = {TS_KEY: ts}
                try:
                    pred = seg(datastore.get_image_uri(image_id))
                    info[SCORE_KEY] = float(pred.stats["case_score"])
                    if "slice_scores" in pred.stats:
                        info[SLICES_KEY] = pred.stats["slice_scores"]
                    scored[image_id] = info[SCORE_KEY]
                except InputError as e:  # unreadable image: remember, do not retry until the model changes
                    info[SCORE_KEY] = info[SLICES_KEY] = None
                    failed[image_id] = str(e)
                    logger.warning(f"segdiff_uncertainty: {image_id}: {e}")
                datastore.refresh()  # pick up what the server wrote meanwhile before writing our copy
                if image_id in datastore.get_unlabeled_images():
                    datastore.update_image_info(image_id, finite(info))
                logger.info(f"segdiff_uncertainty: {image_id} = {info[SCORE_KEY]} ({time.time() - t0:.2f}s)")
            if not changed:
                break
        return finite(
            {
                "scored": len(scored),
                "failed": failed,
                "rounds": rounds,
                "model_ts": self.model.ts(),
                "seconds": round(time.time() - start, 2),
                "waited_for_infer_seconds": round(waited, 2),
                "scores": scored,
            }
        )
