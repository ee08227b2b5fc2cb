"""Strategy ``segdiff_uncertainty``: the unlabeled image with the highest ``segdiff_uncertainty`` score
that is not currently handed to another annotator.

Every pick is a reservation of that image for the asking ``client_id`` (3D Slicer sends its
"Client/User-ID" setting) for ``reserve_seconds``; a client holds one reservation at a time, so asking
again releases (and skips) the previous image. Images reserved by other clients are never returned,
so two annotators never get the same case at once, whichever of the app's strategies they ask (the
strategies share one :class:`Reservations`). Without any score yet (no model, or scoring still running)
the pick is random among the free images.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from monai_segdiff.data import ANNOTATE_REQUEST

from ..scoring.uncertainty import SCORE_KEY, TS_KEY

logger = logging.getLogger(__name__)


class Reservations:
    """Which client holds which image, and since when; one per app, shared by its strategies.

    Args:
        seconds: how long an image handed to a client stays reserved for it.
    """

    def __init__(self, seconds: float = 3600.0):
        self.seconds = float(seconds)
        self.lock = threading.Lock()
        self.by_client: dict[str, tuple[str, float]] = {}  # client_id -> (image_id, time); under ``lock``

    def live(self, now: float) -> dict[str, tuple[str, float]]:
        """The reservations that have not expired at ``now`` (call with ``lock`` held)."""
        return {c: r for c, r in self.by_client.items() if now - r[1] < self.seconds}


class UncertaintyStrategy(Strategy):
    """Highest case uncertainty first, one annotator per image.

    Args:
        reserve_seconds: how long an image handed to a client stays reserved for it (ignored when
            ``reservations`` is given).
        seed: seed of the random fallback (None: system randomness).
        reservations: the reservations shared with the app's other strategies (None: its own).
    """

    def __init__(self, reserve_seconds: float = 3600.0, seed: int | None = None,
                 reservations: Reservations | None = None):
        super().__init__("Most uncertain unlabeled image (diffusion ensemble), one annotator per image")
        self.reservations = reservations or Reservations(reserve_seconds)
        self._random = random.Random(seed)

    @property
    def reserve_seconds(self) -> float:
        return self.reservations.seconds

    @reserve_seconds.setter
    def reserve_seconds(self, seconds: float) -> None:
        self.reservations.seconds = float(seconds)

    def info(self) -> dict[str, Any]:
        return {"description": self.description, "reserve_seconds": self.reserve_seconds}

    def reserved(self, now: float | None = None) -> dict[str, str]:
        """``{image_id: client_id}`` of live reservations."""
        now = time.time() if now is None else now
        with self.reservations.lock:
            return {img: c for c, (img, _) in self.reservations.live(now).items()}

    def __call__(self, request: dict[str, Any], datastore: Datastore):
        client = str(request.get("client_id") or "anonymous")
        images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
        if not images:
            return None
        now = time.time()
        res = self.reservations
        with res.lock:
            live = res.live(now)
            previous = live.pop(client, (None, 0.0))[0]
            taken = {img for img, _ in live.values()}
            free = [i for i in images if i not in taken]
            candidates = [i for i in free if i != previous] or free
            if not candidates:
                logger.info(f"{client}: all {len(images)} unlabeled image(s) are with other annotators")
                res.by_client = live
                return None
            image, how, answer = self.choose(candidates, datastore)
            live[client] = (image, now)
            res.by_client = live
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
            image, how, answer = self._random.choice(sorted(candidates)), "random (no scores yet)", {SCORE_KEY: None,
                                                                                                    TS_KEY: None}
        else:
            image = max(scores, key=lambda i: (scores[i][0], i))
            how, answer = "highest score", {SCORE_KEY: scores[image][0], TS_KEY: scores[image][1]}
        return self.whole(image, datastore), how, answer

    @staticmethod
    def whole(image: str, datastore: Datastore) -> str:
        """``image``, handed out to label whole: a pending ``segdiff_slices`` request for it is withdrawn (its
        next label is not a partial one)."""
        if datastore.get_image_info(image).get(ANNOTATE_REQUEST):
            datastore.update_image_info(image, {ANNOTATE_REQUEST: None})
        return image
