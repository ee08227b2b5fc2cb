"""Strategy ``segdiff_slices``: partial annotation. The unlabeled image whose most uncertain slices are the
most uncertain, handed out with those slices to annotate (one annotator per image, as
``segdiff_uncertainty``).

The answer carries ``annotate``: the image array's ``axis`` the slices lie across (the axial one for a
slice model), their indices and, for 3D Slicer's slice views, their positions along S in millimetres. The
request is kept in the image info (``segdiff_annotate``, live as long as the reservation); when a label
for the image is submitted while it is live, the datastore records those slices as the annotated ones (``monai_segdiff.data.annotated_slices``): the rest
of that label counts as unannotated, not as background, and training learns from the annotated slices
only (and from any slice where a structure was drawn).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import SimpleITK as sitk
from monailabel.interfaces.datastore import Datastore

from monai_segdiff import selection
from monai_segdiff.data import ANNOTATE_REQUEST

from ..scoring.uncertainty import SLICES_KEY, TS_KEY
from .uncertainty import Reservations, UncertaintyStrategy

logger = logging.getLogger(__name__)

ANNOTATE_KEY = ANNOTATE_REQUEST  # image info: the slices handed out for annotation


class SlicesStrategy(UncertaintyStrategy):
    """The most uncertain slices of the unlabeled images.

    Args:
        slices: slices to annotate per image (at least ``selection.SLICE_GAP`` apart).
        reserve_seconds, seed, reservations: as :class:`UncertaintyStrategy`.
    """

    def __init__(self, slices: int = 4, reserve_seconds: float = 3600.0, seed: int | None = None,
                 reservations: Reservations | None = None):
        super().__init__(reserve_seconds=reserve_seconds, seed=seed, reservations=reservations)
        self.slices = int(slices)
        self.description = (f"Partial annotation: the unlabeled image whose {self.slices} most uncertain slices are the "
                            "most uncertain, with those slices (only they need a label)")

    def info(self) -> dict[str, Any]:
        return {**super().info(), "slices": self.slices}

    def choose(self, candidates: list[str], datastore: Datastore) -> tuple[str, str, dict[str, Any]]:
        ranked = {}
        for image_id in candidates:
            info = datastore.get_image_info(image_id)
            per_slice = info.get(SLICES_KEY)
            if isinstance(per_slice, dict) and per_slice.get("slices"):
                scores = dict(zip((int(j) for j in per_slice["slices"]), (float(v) for v in per_slice["scores"])))
                ranked[image_id] = (*selection.case_slices(scores, self.slices), int(per_slice["axis"]), info.get(TS_KEY))
        if not ranked:
            image = self.whole(self._random.choice(sorted(candidates)), datastore)
            return image, "random (no slice scores yet: annotate the whole image)", {"annotate": None}
        image = max(ranked, key=lambda i: (ranked[i][1], i))
        slices, score, axis, ts = ranked[image]
        annotate = {"axis": axis, "slices": slices, "positions_mm": _positions(datastore, image, axis, slices)}
        request = {"axis": axis, "slices": slices, "until": time.time() + self.reserve_seconds}  # as the reservation
        datastore.update_image_info(image, {ANNOTATE_KEY: request})
        return image, "most uncertain slices", {"annotate": annotate, "score": score, TS_KEY: ts}


def _positions(datastore: Datastore, image_id: str, axis: int, slices: list[int]) -> list[float] | None:
    """The S coordinate (mm, as 3D Slicer's axial slider shows it) of each slice's centre, from the image
    header (ITK's index order is the image array's; S is the third coordinate in LPS and RAS alike)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(datastore.get_image_uri(image_id))
    try:
        reader.ReadImageInformation()
    except RuntimeError:  # positions are a convenience; the indices are the record
        return None
    size = reader.GetSize()
    if len(size) < 3:
        return None
    origin, spacing = np.asarray(reader.GetOrigin()[:3]), np.asarray(reader.GetSpacing()[:3])
    direction = np.asarray(reader.GetDirection()).reshape(len(size), len(size))[:3, :3]
    centre = (np.asarray(size[:3], dtype=np.float64) - 1) / 2
    out = []
    for j in slices:
        p = centre.copy()
        p[axis] = j
        out.append(round(float((origin + direction @ (spacing * p))[2]), 2))
    return out
