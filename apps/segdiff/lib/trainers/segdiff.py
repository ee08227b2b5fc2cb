"""Train task ``segdiff_train``: the library's retraining (``monai_segdiff.retrain``: options checked
once, honest labels or ERROR with the reason, publish only a model that beats the served one) on the
datastore's final labels, in the subprocess MONAI Label starts. Progress and results go to
``train_stats.json`` beside the model, which ``stats()`` returns for ``/info`` (3D Slicer reads
``epoch``, ``total_epochs``, ``best_metric``, ``total_time``); the shipped sample model is never written.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import math
import os
import time
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.utils.async_tasks.utils import processes
from monailabel.utils.others.generic import name_to_device, strtobool

from monai_segdiff import data as sd_data
from monai_segdiff import distributed
from monai_segdiff.config import NETWORKS
from monai_segdiff.io import write_json
from monai_segdiff.labelset import label_names as studies_label_names
from monai_segdiff.values import finite
from monai_segdiff.retrain import RetrainOptions, plan, retrain
from monai_segdiff.tracking import TRACKING, tracker
from monai_segdiff.training import TrainResult
from monai_segdiff.errors import InputError

from ..infers.options import devices

logger = logging.getLogger(__name__)


def _hms(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


class SegDiffTrain(TrainTask):
    """Fine-tune (``pretrained``) or train a new model on the datastore's final labels.

    Args:
        model_path: where the run publishes its model (the studies' own model file).
        studies: the folder of the label set (``labels.json``: the studies folder, or the app's folder
            for a remote datastore); without it, ``label1..labelK`` up to the largest stored value.
        base_path: the model served while ``model_path`` does not exist yet (e.g. the shipped sample
            model): fine-tuned from when it fits, never written.
        network: network of a new model.
        device: default device.
        max_epochs: default epochs shown to clients.
        max_minutes: default time budget (0: none).
    """

    def __init__(
        self,
        model_path: str,
        studies: str,
        base_path: str | None = None,
        network: str = RetrainOptions().network,
        device: str = "cpu",
        max_epochs: int = 10,
        max_minutes: float = 30.0,
        description: str = "Train / fine-tune the diffusion segmentation model on the final labels",
    ):
        super().__init__(description)
        self.model_path = os.path.abspath(model_path)
        self.base_path = os.path.abspath(base_path) if base_path else None
        self.studies = studies
        self.defaults = RetrainOptions(epochs=int(max_epochs) or None, max_minutes=float(max_minutes) or None,
                                       network=network)
        self.device = device
        self.stats_path = os.path.join(os.path.dirname(self.model_path), "train_stats.json")

    def config(self) -> dict[str, Any]:
        # Slicer shows lists as combo boxes and sends their first entry: tracking stays off unless chosen.
        d = self.defaults
        return {
            "max_epochs": d.epochs or 0,
            "max_minutes": d.max_minutes or 0,  # 0: no time limit
            "val_split": d.val_split,
            "train_batch_size": d.batch_size,
            "learning_rate": d.lr,
            "iterations_per_epoch": 0,  # 0: automatic (one pass over the slices, 20..200)
            "pretrained": True,  # fine-tune the current model when its labels match
            "network": [d.network] + [n for n in NETWORKS if n != d.network],  # for a new model
            "click_channels": d.click_channels,  # a new model also learns from simulated clicks (segdiff_clicks)
            "device": devices(self.device),
            "multi_gpu": False,  # DDP, one process per GPU of `gpus` (without CUDA: one CPU process per id)
            "gpus": "all",  # "all" or ids like "0,1"
            "tracking": list(TRACKING),
        }

    def stats(self) -> dict[str, Any]:
        try:
            with open(self.stats_path) as f:
                stats = json.load(f)
        except (OSError, ValueError):
            return {}
        if stats.get("status") == "RUNNING" and not processes("train"):  # stopped (DELETE /train/) or killed
            stats["status"] = "STOPPED"
        return stats

    # -- the run --------------------------------------------------------------------------------
    def request(self, request: dict[str, Any]) -> dict[str, Any]:
        """Defaults (first entry of every list) updated by the request."""
        req = {k: (v[0] if isinstance(v, list) and v else v) for k, v in self.config().items()}
        req.update({k: v for k, v in request.items() if v is not None})
        return req

    def __call__(self, request: dict[str, Any], datastore: Datastore):
        req = self.request(request)
        logger.info(f"Train request: {req}")
        start = time.time()
        device = str(name_to_device(req.get("device") or self.device))
        items = [dict(d, id=sd_data.image_id(d["image"])) for d in datastore.datalist()]
        try:
            if os.path.isdir(self.studies or ""):  # partial labels (segdiff_slices): their annotated slices
                items = sd_data.with_annotated(items, self.studies)
            options = RetrainOptions.from_request(req, self.defaults)
            ranks = distributed.rank_devices(strtobool(req.get("multi_gpu")), req.get("gpus"), device)
            labels = studies_label_names(self.studies if os.path.isdir(self.studies or "") else os.devnull, items)
            run = plan(items, labels, self.source_model(), options, device)
        except (InputError, ValueError) as e:  # the run cannot be honest: ERROR with the reason, shown by /info
            self._write({"status": "ERROR", "error": str(e), "start_ts": int(start), "epoch": 0, "published": False,
                         "best_metric": None, "total_time": _hms(time.time() - start)})
            raise MONAILabelException(MONAILabelError.INVALID_INPUT, str(e)) from e
        base = {
            "status": "RUNNING", "start_ts": int(start), "epoch": 0, "total_epochs": options.epochs or 1,
            "best_metric": 0.0, "best_metric_epoch": -1, "key_metric_name": "val_dice",
            "baseline_metric": run.baseline, "published": False, "init": run.start.init,
            "init_reason": run.start.reason, "network": run.start.config.network, "labels": run.start.config.labels,
            "train_cases": len(run.train_items), "val_cases": len(run.val_items), "world_size": len(ranks),
            "partial_cases": sum(1 for it in run.train_items + run.val_items if it.get("annotated")),
            "model": self.model_path, "request": {k: req.get(k) for k in self.config()},
        }
        self._write({**base, "current_time": _hms(0)})
        writer = tracker(str(req.get("tracking", "none")), os.path.join(os.path.dirname(self.model_path), "runs"))

        def on_epoch(s: dict) -> None:
            elapsed = time.time() - start
            total = options.epochs or max(s["epoch"], int(options.max_minutes * 60 / max(elapsed / s["epoch"], 1e-6)))
            best = s["best_dice"] if s["best_dice"] is not None and math.isfinite(s["best_dice"]) else 0.0
            base.update(epoch=s["epoch"], total_epochs=max(total, s["epoch"]), best_metric=max(best, 0.0),
                        loss=s["loss"], val_dice=s["val_dice"], steps=s["step"], published=s["published"])
            self._write({**base, "current_time": _hms(elapsed)})
            logger.info(f"epoch {s['epoch']}: loss {s['loss']:.4f} val_dice {s['val_dice']:.4f} best {best:.4f}")
            if writer is not None:
                writer(s)

        runner = functools.partial(distributed.train_distributed, ranks) if len(ranks) > 1 else None
        try:
            results, publisher = retrain(run, self.model_path, options, device, callback=on_epoch, runner=runner)
        except (InputError, ValueError, distributed.DistributedError) as e:
            self._write({**base, "status": "ERROR", "error": str(e), "total_time": _hms(time.time() - start)})
            raise MONAILabelException(MONAILabelError.APP_TRAIN_FAILED, str(e)) from e
        finally:
            if writer is not None:
                writer.close()
        result = results[0]  # rank 0: validated and saved
        final = self.final_stats(base, results, start)
        final["published"] = publisher.published
        final["model_ts"] = os.stat(self.model_path).st_mtime if publisher.published else None
        if publisher.kept is not None:
            final["replaced_model_kept"] = str(publisher.kept)
        note = publisher.note(result.best_dice, bool(run.val_items))
        if note:
            final["note"] = note
            logger.warning(note)
        self._write(final)
        logger.info(f"Training done: {json.dumps(finite(final))}")
        return finite(final)

    @staticmethod
    def final_stats(base: dict, results: list[TrainResult], start: float) -> dict[str, Any]:
        """The ``/info`` stats of a finished run (``results``: one per rank, rank 0 first)."""
        result = results[0]
        return {
            **base, "status": "DONE", "epoch": result.epochs, "total_epochs": result.epochs,
            "total_time": _hms(time.time() - start), "seconds": round(time.time() - start, 2),
            "best_metric": result.best_dice if math.isfinite(result.best_dice) else base["best_metric"],
            "best_metric_epoch": result.best_epoch, "steps": result.steps, "rank_steps": [r.steps for r in results],
            "losses": result.losses, "val_dices": result.val_dice,
        }

    def source_model(self) -> str | None:
        """The model a run fine-tunes: the one published for these studies, else the base model served
        until then (e.g. the shipped sample model)."""
        if os.path.isfile(self.model_path) or not self.base_path:
            return self.model_path
        return self.base_path

    def _write(self, stats: dict) -> None:
        try:
            write_json(finite(stats), self.stats_path)
        except OSError as e:
            logger.warning(f"cannot write train stats {self.stats_path}: {e}")
