"""Builds the app's tasks from ``--conf`` options (every option has a default, so a bare
``monailabel start_server --app apps/segdiff --studies DIR`` works).

==========================  =================================  ===========================================
option                      default                            meaning
==========================  =================================  ===========================================
model_path                  "" (see below)                     a checkpoint of yours: served, and published by training
samples                     0 (the model's)                    ensemble size of interactive infer
steps                       0 (the model's)                    sampling steps of interactive infer
device                      cuda if available, else cpu        torch device
uncertainty                 "" (the model's)                   entropy | mutual_information | variance | disagreement
uncertainty_threshold       0.5                                voxels above it form the "uncertain" segment
seed                        0                                  sampling seed
cache_size                  4                                  predictions kept for reuse
preload                     false                              load the model when the server starts
scoring_samples             3                                  ensemble size for active-learning scores
scoring_steps               2                                  sampling steps for active-learning scores
network                     the library's (SegDiffConfig)      network when training from scratch
max_epochs                  10                                 default epochs of the trainer
max_minutes                 30                                 default time budget of a training run (0: none)
reserve_minutes             60                                 how long a picked image stays with its annotator
annotate_slices             4                                  slices per image of the segdiff_slices strategy
postprocess                 "" (the model's)                   median,confident_component,largest_component,fill_holes | none
tta_flips                   0 (the model's)                    test-time mirror views per member of interactive infer (1..8)
==========================  =================================  ===========================================

Without ``model_path`` the app serves the studies' own model (``<studies>/.segdiff/model/segdiff.pt``)
once training has published one, the shipped sample model until then (never written).
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any

import torch
from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask

from monai_segdiff.config import NETWORKS, SegDiffConfig
from monai_segdiff.errors import InputError
from monai_segdiff.labelset import LabelSet
from monai_segdiff.postprocess import parse_postprocess
from monai_segdiff.retrain import RetrainOptions
from monai_segdiff.values import flag

from ..activelearning import FreeRandomStrategy, Reservations, SlicesStrategy, UncertaintyStrategy
from ..infers.segdiff import SegDiffInfer
from ..infers.segdiff_clicks import SegDiffClicksInfer
from ..infers.segdiff_uncertainty import SegDiffUncertaintyInfer
from ..model import SegDiffModel
from ..scoring.uncertainty import UncertaintyScoring
from ..trainers.segdiff import SegDiffTrain

logger = logging.getLogger(__name__)

DEFAULTS: dict[str, str] = {
    "model_path": "",
    "samples": "0",
    "steps": "0",
    "device": "",
    "uncertainty": "",
    "uncertainty_threshold": "0.5",
    "seed": "0",
    "cache_size": "4",
    "preload": "false",
    "scoring_samples": "3",
    "scoring_steps": "2",
    "network": "",
    "max_epochs": str(RetrainOptions().epochs),  # the library's retraining defaults
    "max_minutes": f"{RetrainOptions().max_minutes:g}",
    "reserve_minutes": "60",
    "annotate_slices": "4",
    "postprocess": "",
    "tta_flips": "0",
}


class ConfError(ValueError):
    """A ``--conf`` value that cannot be used."""


def studies_model_path(studies: str | None, name: str) -> str:
    """Where training publishes the model of a studies folder: ``<studies>/.segdiff/model/<name>.pt``;
    for a remote datastore (DICOMweb URL) a folder of its own under ``~/.cache/monai-segdiff/``."""
    if studies and os.path.isdir(studies):
        return os.path.abspath(os.path.join(studies, ".segdiff", "model", f"{name}.pt"))
    key = hashlib.sha1(str(studies).encode()).hexdigest()[:12]
    return os.path.join(os.path.expanduser("~"), ".cache", "monai-segdiff", key, f"{name}.pt")


class SegDiffTaskConfig(TaskConfig):
    """Infer (``segdiff``, ``segdiff_uncertainty``), train (``segdiff_train``), scoring and strategy
    (``segdiff_uncertainty``) over one shared model file."""

    def init(self, name: str, model_dir: str, conf: dict[str, str], planner: Any, **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        unknown = sorted(set(conf) - set(DEFAULTS) - {"server_mode", "models", "auth_token"})
        if unknown:
            logger.warning(f"unknown --conf option(s) ignored: {', '.join(unknown)}; known: {', '.join(DEFAULTS)}")
        self.studies = kwargs.get("studies")
        # the label set and the models of a studies folder live in it; a remote datastore gets a folder
        self.label_folder = self.studies if self.studies and os.path.isdir(self.studies) else os.path.dirname(
            studies_model_path(self.studies, name))
        self.shipped = os.path.abspath(os.path.join(model_dir, f"{name}.pt"))
        given = os.path.abspath(self.option("model_path")) if self.option("model_path") else None
        if given and given != self.shipped:  # the user's own model file: served, and published by training
            self.path, self.base = given, None
        else:  # the studies' own model, the shipped model until training publishes one: never overwritten
            self.path, self.base = studies_model_path(self.studies, name), self.shipped
        self.device = self.option("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        self.preload = flag(self.option("preload"))
        tta_flips = self.number("tta_flips", int)
        if not 0 <= tta_flips <= 8:
            raise ConfError(f"--conf tta_flips must be 0 (the model's) or 1..8, got {tta_flips}")
        self.model = SegDiffModel(
            self.path, samples=self.number("samples", int) or None, steps=self.number("steps", int) or None,
            device=self.device, threshold=self.number("uncertainty_threshold", float),
            uncertainty=self.option("uncertainty") or None, seed=self.number("seed", int),
            cache_size=self.number("cache_size", int),
            fallback_labels=self.label_set(),
            postprocess=self.postprocess_option(),
            tta_flips=tta_flips or None,
            fallback=self.base,
        )
        self.model.studies_labels = self.label_set
        if not 0.0 < self.model.threshold < 1.0:
            raise ConfError(f"--conf uncertainty_threshold must be in (0, 1), got {self.model.threshold}")
        self.network = self.option("network") or SegDiffConfig().network
        if self.network not in NETWORKS:
            raise ConfError(f"--conf network must be one of {', '.join(NETWORKS)}, got {self.network!r}")
        self.labels = self.model.label_names()
        logger.info(
            f"segdiff: model {self.path} ({'found' if self.model.exists() else 'not found yet'}), "
            f"device {self.device}, labels {self.labels}"
        )

    def label_set(self) -> list[str]:
        """The studies' foreground label names by value (``labels.json`` in ``label_folder``)."""
        try:
            return LabelSet.load(self.label_folder).foreground
        except InputError as e:
            logger.warning(f"studies label set: {e}")
            return []

    def option(self, key: str) -> str:
        value = self.conf.get(key, DEFAULTS[key])
        return str(value).strip() if value is not None else ""

    def postprocess_option(self) -> list[str] | None:
        """``--conf postprocess``: None (the model's own setting) or the options to apply."""
        value = self.option("postprocess")
        if not value:
            return None
        try:
            return parse_postprocess(value)
        except ValueError as e:
            raise ConfError(f"--conf postprocess: {e}") from None

    def number(self, key: str, kind=float):
        value = self.option(key) or DEFAULTS[key]
        try:
            out = kind(float(value))
        except ValueError:
            raise ConfError(f"--conf {key} must be a number, got {value!r}") from None
        if out < 0:
            raise ConfError(f"--conf {key} must be >= 0, got {value!r}")
        return out

    def infer(self) -> dict[str, InferTask]:
        return {
            self.name: SegDiffInfer(self.model),
            f"{self.name}_uncertainty": SegDiffUncertaintyInfer(self.model),
            f"{self.name}_clicks": SegDiffClicksInfer(self.model),
        }

    def trainer(self) -> TrainTask:
        return SegDiffTrain(
            self.path,
            self.label_folder,
            base_path=self.base,
            network=self.network,
            device=self.device,
            max_epochs=self.number("max_epochs", int),
            max_minutes=self.number("max_minutes", float),
        )

    def strategy(self) -> dict[str, Strategy]:
        shared = Reservations(60 * self.number("reserve_minutes"))  # one annotator per image, whichever strategy
        return {  # the first is Slicer's default: what won the simulations (BENCHMARKS.md, sessions 16-17)
            f"{self.name}_random": FreeRandomStrategy(reservations=shared),
            f"{self.name}_uncertainty": UncertaintyStrategy(reservations=shared),
            f"{self.name}_slices": SlicesStrategy(slices=max(1, self.number("annotate_slices", int)),
                                                  reservations=shared),
        }

    def scoring_method(self) -> dict[str, ScoringMethod]:
        return {
            f"{self.name}_uncertainty": UncertaintyScoring(
                self.model,
                samples=max(1, self.number("scoring_samples", int)),
                steps=max(1, self.number("scoring_steps", int)),
            )
        }
