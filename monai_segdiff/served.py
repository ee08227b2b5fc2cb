"""The model a server segments with: the checkpoint file it serves (the studies' own model once trained,
else a fallback such as the shipped sample model), one :class:`Segmenter` per (file version, settings),
reloaded when the file changes, an LRU of recent predictions, and what the model can and cannot segment
of the studies' label set (:meth:`ServedModel.coverage`).

Errors are the library's: :class:`ModelMissing`, :class:`ModelUnusable`, :class:`ImageMissing` and
``InputError`` for an image it cannot segment; a server maps them to its answers (the MONAI Label app:
404, 503, 404, 422).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from monai.data import MetaTensor

from .cache import LRUCache, file_signature
from .clicks import Clicks
from .config import CheckpointError, SegDiffConfig, load_checkpoint
from .segmenter import Prediction, Segmenter
from .values import finite

__all__ = ["ServedModel", "CachedPrediction", "ModelMissing", "ModelUnusable", "ImageMissing", "model_ts"]

logger = logging.getLogger(__name__)


class ModelMissing(FileNotFoundError):
    """No model file to serve (yet)."""


class ModelUnusable(RuntimeError):
    """A model file that cannot be loaded or built."""


class ImageMissing(FileNotFoundError):
    """The image to segment does not exist."""


@dataclass
class CachedPrediction:
    """What the infer tasks need from a `Prediction` (the ensemble itself is dropped to save memory)."""

    label: MetaTensor  # [1, *spatial] uint8, input grid
    uncertainty: MetaTensor  # [1, *spatial] float32 in [0, 1], input grid
    stats: dict
    model_ts: float  # st_mtime of the model file that produced it

    @property
    def affine(self) -> np.ndarray:
        return np.asarray(self.label.affine, dtype=np.float64)


def model_ts(path: str) -> float | None:
    """``os.stat(path).st_mtime`` (the value written to ``segdiff_uncertainty_ts``), None if absent."""
    try:
        return os.stat(path).st_mtime
    except FileNotFoundError:
        return None


class ServedModel:
    """The served checkpoint and its predictions.

    Args:
        path: checkpoint file (may not exist yet: tasks then answer 404 until a model is trained).
        fallback: the file served while ``path`` does not exist (e.g. the shipped sample model, when
            ``path`` is the studies' own model that training will publish).
        samples: default ensemble size (None: the checkpoint's).
        steps: default sampling steps (None: the checkpoint's).
        device: default torch device.
        threshold: uncertainty above which a voxel counts as uncertain.
        uncertainty: voxel uncertainty measure (None: the checkpoint's).
        seed: sampling seed (same image + model + seed -> same answer).
        cache_size: predictions kept for reuse (segmentation then uncertainty on the same image).
        fallback_labels: label names to advertise while there is no model (e.g. from ``labels.json``).
        postprocess: clean-up of the fused mask (None: the checkpoint's ``postprocess``).
        tta_flips: test-time mirror views per ensemble member (None: the checkpoint's ``tta_flips``).
    """

    def __init__(
        self,
        path: str,
        samples: int | None = None,
        steps: int | None = None,
        device: str = "cpu",
        threshold: float = 0.5,
        uncertainty: str | None = None,
        seed: int = 0,
        cache_size: int = 4,
        fallback_labels: list[str] | tuple[str, ...] = (),
        postprocess: list[str] | None = None,
        tta_flips: int | None = None,
        fallback: str | None = None,
    ) -> None:
        self.own_path = os.path.abspath(os.path.expanduser(path))
        self.studies_labels: Callable[[], list[str]] = list  # the studies' label set (set by the app)
        self.fallback = os.path.abspath(os.path.expanduser(fallback)) if fallback else None
        self.samples, self.steps, self.device = samples, steps, device
        self.threshold, self.uncertainty, self.seed = float(threshold), uncertainty, int(seed)
        self.fallback_labels = list(fallback_labels)
        self.postprocess, self.tta_flips = postprocess, tta_flips
        self.predictions: LRUCache[CachedPrediction] = LRUCache(cache_size)
        self._segmenters: LRUCache[Segmenter] = LRUCache(2)
        # plain predictions with their ensembles, reused by click updates (the two latest images)
        self.plains: LRUCache[Prediction] = LRUCache(2)
        self._lock = threading.Lock()
        self._config: tuple[tuple | None, SegDiffConfig | None] = (None, None)
        self._current: tuple | None = None

    # -- the file -------------------------------------------------------------------------------
    @property
    def path(self) -> str:
        """The file served now: the own model once it exists, else the fallback (if any)."""
        if self.fallback is None or os.path.isfile(self.own_path):
            return self.own_path
        return self.fallback

    def exists(self) -> bool:
        return os.path.isfile(self.path)

    def ts(self) -> float | None:
        return model_ts(self.path)

    def signature(self) -> tuple:
        try:
            return file_signature(self.path)
        except FileNotFoundError:
            raise ModelMissing(
                f"no model file at {self.path} yet: train one first (3D Slicer: Train; or POST /train/segdiff_train) "
                f"or start the server with --conf model_path <checkpoint.pt>"
            ) from None

    def config(self) -> SegDiffConfig | None:
        """The checkpoint's config (cached per file version); None without a readable model."""
        try:
            sig = file_signature(self.path)
        except FileNotFoundError:
            return None
        with self._lock:
            if self._config[0] == sig:
                return self._config[1]
        try:
            cfg = load_checkpoint(self.path)[1]
        except CheckpointError as e:
            logger.warning(f"model file not usable: {e}")
            cfg = None
        with self._lock:
            self._config = (sig, cfg)
        return cfg

    def label_names(self) -> dict[str, int]:
        """``{name: value}`` with background 0, from the model, else from ``fallback_labels``."""
        cfg = self.config()
        if cfg is not None:
            return dict(cfg.label_names)
        if self.fallback_labels:
            return {"background": 0, **{n: i + 1 for i, n in enumerate(self.fallback_labels)}}
        return {}

    def coverage(self) -> dict:
        """What the served model can and cannot segment of the studies' label set (``studies_labels``),
        in words for the annotator: ``/info`` and every infer answer carry it."""
        model = [n for n, v in sorted(self.label_names().items(), key=lambda kv: kv[1]) if v > 0] if self.config() else []
        wanted = list(self.studies_labels())
        known = {n.lower() for n in model}
        missing = [n for n in wanted if n.lower() not in known]
        extra = [n for n in model if n.lower() not in {w.lower() for w in wanted}]
        notes = []
        if not model:
            notes.append("no model yet: submit labels and train (segdiff_train)")
        elif missing:
            notes.append(f"no model for {', '.join(map(repr, missing))} yet: submit labels and train (segdiff_train)")
        if model and wanted and extra:
            notes.append(f"the model segments {', '.join(map(repr, extra))}, not in the studies' label set")
        return {
            "model": self.path,
            "model_labels": model,
            "label_set": wanted,
            "can_segment": [n for n in model if not wanted or n.lower() in {w.lower() for w in wanted}],
            "cannot_segment": missing,
            "message": "; ".join(notes) or "the model segments every label of the studies' label set",
        }

    # -- inference ------------------------------------------------------------------------------
    def segmenter(
        self, samples: int | None = None, steps: int | None = None, device: str | None = None,
        tta_flips: int | None = None,
    ):
        """``(Segmenter, file signature)`` for the current file version; old versions are dropped."""
        sig = self.signature()
        with self._lock:
            if self._current != sig:
                if self._current is not None:
                    logger.info(f"model file changed ({self.path}): reloading")
                self._segmenters.clear()
                self.predictions.clear()
                self.plains.clear()
                self._current = sig
        samples = samples or self.samples
        steps = steps or self.steps
        device = device or self.device
        tta_flips = tta_flips or self.tta_flips
        key = (sig, samples, steps, device, tta_flips)

        def load() -> Segmenter:
            try:
                return Segmenter.from_checkpoint(
                    self.path, num_samples=samples, steps=steps, seed=self.seed, device=device,
                    uncertainty=self.uncertainty, threshold=self.threshold, postprocess=self.postprocess,
                    tta_flips=tta_flips,
                )
            except FileNotFoundError:
                raise self._missing() from None
            except (CheckpointError, ValueError, RuntimeError) as e:
                raise ModelUnusable(f"cannot use model file {self.path}: {e}") from e

        return self._segmenters.get_or_compute(key, load)[0], sig

    def _missing(self) -> ModelMissing:
        try:
            self.signature()
        except ModelMissing as e:
            return e
        return ModelMissing(f"model file {self.path} disappeared while loading")

    def _keyed(self, image: str, samples: int | None, steps: int | None, device: str | None) -> tuple:
        """``(Segmenter, image file signature, cache key)`` of one image, model version and settings."""
        seg, sig = self.segmenter(samples, steps, device)
        try:
            image_sig = file_signature(image)
        except (FileNotFoundError, TypeError, ValueError):
            raise ImageMissing(f"image not found: {image!r}") from None
        return seg, image_sig, (image_sig, sig, seg.num_samples, steps or self.steps, device or self.device, seg.tta_flips)

    def predict(
        self, image: str, samples: int | None = None, steps: int | None = None, device: str | None = None
    ) -> tuple[CachedPrediction, bool]:
        """Segment ``image`` (a file path) or reuse the cached result: ``(prediction, cached)``."""
        ts = self.ts()
        seg, image_sig, key = self._keyed(image, samples, steps, device)

        def compute() -> CachedPrediction:
            p = seg(image_sig[0])  # InputError for an image it cannot segment
            self.plains.put(key, p)
            return CachedPrediction(p.label, p.uncertainty.float(), finite(p.stats), ts)

        return self.predictions.get_or_compute(key, compute)

    def correct(
        self, image: str, clicks: Clicks | None = None, known: tuple | None = None, samples: int | None = None,
        steps: int | None = None, device: str | None = None,
    ) -> tuple[CachedPrediction, bool]:
        """Re-segment ``image`` holding the annotator's ``clicks`` (input voxel indices) and ``known``
        label voxels (see ``Segmenter.__call__``), reusing the plain prediction of the same image, model
        and settings (computed first if needed): ``(prediction, plain prediction was cached)``."""
        ts = self.ts()
        seg, image_sig, key = self._keyed(image, samples, steps, device)
        plain, cached = self.plains.get_or_compute(key, lambda: seg(image_sig[0]))
        if clicks:
            clicks = clicks.check_within(plain.label.shape[1:])
        p = seg(None, clicks=clicks, known=known, previous=plain)
        if clicks:  # how sure the ensemble was at the clicked voxels before and after the clicks
            at = lambda u: float(np.mean([float(u[(0, *q)]) for _, q in clicks.points]))  # noqa: E731
            p.stats["interaction"].update(clicked_uncertainty_before=at(plain.uncertainty),
                                          clicked_uncertainty_after=at(p.uncertainty))
        return CachedPrediction(p.label, p.uncertainty.float(), finite(p.stats), ts), cached
