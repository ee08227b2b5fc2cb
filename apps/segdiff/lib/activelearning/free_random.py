"""Strategy ``segdiff_random``: a random unlabeled image that no other annotator holds.

MONAI Label's own ``random`` draws among all unlabeled images, so two annotators can get the same one;
this draws among the free ones, with the reservations of :class:`~.uncertainty.UncertaintyStrategy`
(shared with the app's other strategies). It is the app's default because it is what won: on a
140-case pool with outliers, random whole cases beat every scored rule (BENCHMARKS.md, sessions 16-17).
"""

from __future__ import annotations

from typing import Any

from monailabel.interfaces.datastore import Datastore

from .uncertainty import Reservations, UncertaintyStrategy


class FreeRandomStrategy(UncertaintyStrategy):
    """A random free unlabeled image, one annotator per image.

    Args:
        reserve_seconds, seed, reservations: as :class:`UncertaintyStrategy`.
    """

    def __init__(self, reserve_seconds: float = 3600.0, seed: int | None = None,
                 reservations: Reservations | None = None):
        super().__init__(reserve_seconds=reserve_seconds, seed=seed, reservations=reservations)
        self.description = ("Random unlabeled image, one annotator per image (the default: it beat the "
                            "uncertainty rules for whole images in the simulations, BENCHMARKS.md)")

    def choose(self, candidates: list[str], datastore: Datastore) -> tuple[str, str, dict[str, Any]]:
        return self.whole(self._random.choice(sorted(candidates)), datastore), "random", {}
