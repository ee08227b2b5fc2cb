"""Strategy ``segdiff_uncertainty``: the unlabeled image with the highest ``segdiff_uncertainty`` score
that is not currently handed to another annotator.

Every pick is a reservation of that image for the asking ``client_id`` (3D Slicer sends its
"Client/User-ID" setting) for ``reserve_seconds``; a client holds one reservation at a time, so asking
again releases (and skips) the previous image. Images reserved by other clients are never returned,
so two annotators never get the same case at once. Without any score yet (no model, or scoring still
running) the pick is random among the free images.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from ..scoring.uncertainty import SCORE_KEY, TS_KEY

logger = logging.getLogger(__name__)


class UncertaintyStrategy(Strategy):
    """Highest case uncertainty first, one annotator per image.

    Args:
        reserve_seconds: how long an image handed to a client stays reserved for it.
        seed: seed of the random fallback (None: system randomness).
    """

    def __init__(self, reserve_seconds: float = 3600.0, seed: int | None = None):
        super().__init__("Most uncertain unlabeled image (diffusion ensemble), one annotator per image")
        self.reserve_seconds = float(reserve_seconds)
        self._reservations: dict[str, tuple[str, float]] = {}  # client_id -> (image_id, time)
        self._lock = threading.Lock()
        self._random = random.Random(seed)

    def info(self) -> dict[str, Any]:
        return {"description": self.description, "reserve_seconds": self.reserve_seconds}

    def reserved(self, now: float | None = None) -> dict[str, str]:
        """``{image_id: client_id}`` of live reservations."""
        now = time.time() if now is None else now
        with self._lock:
            return {img: c for c, (img, t) in self._reservations.items() if now - t < self.reserve_seconds}

    def __call__(self, request: dict[str, Any], datastore: Datastore):
        client = str(request.get("client_id") or "anonymous")
        images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
        if not images:
            return None
        now = time.time()
        with self._lock:
            live = {c: r for c, r in self._reservations.items() if now - r[1] < self.reserve_seconds}
            previous = live.pop(client, (None, 0.0))[0]
            taken = {img for img, _ in live.values()}
            free = [i for i in images if i not in taken]
            candidates = [i for i in free if i != previous] or free
            if not candidates:
                logger.info(f"{client}: all {len(images)} unlabeled image(s) are with other annotators")
                self._reservations = live
                return None
            image, how, answer = self.choose(candidates, datastore)
            live[client] = (image, now)
            self._reservations = live
        logger.info(f"{client}: {image} ({how}; {answer}; {len(taken)} reserved by others)")
        return {"id": image, **answer, "selection": how}

    def choose(self, candidates: list[str], datastore: Datastore) -> tuple[str, str, dict[str, Any]]:
        """``(image id, how it was chosen, what the answer carries besides)`` among free ``candidates``:
        the highest case score (ties: the larger id), or a random image while none is scored."""
        scores = {}
        for image_id in candidates:
            info = datastore.get_image_info(image_id)
            score = info.get(SCORE_KEY)
            if isinstance(score, (int, float)):
                scores[image_id] = (float(score), info.get(TS_KEY))
        if not scores:
            return self._random.choice(sorted(candidates)), "random (no scores yet)", {SCORE_KEY: None, TS_KEY: None}
        image = max(scores, key=lambda i: (scores[i][0], i))
        return image, "highest score", {SCORE_KEY: scores[image][0], TS_KEY: scores[image][1]}
