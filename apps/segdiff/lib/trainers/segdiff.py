"""Train task ``segdiff_train``: the library's diffusion training on the datastore's final labels.

MONAI Label runs it in a background subprocess (``/train`` answers 429 while one runs). The labels are
checked first (``training.check_labels``): every value in the studies' label set, some foreground, at
least two labels with foreground so one can validate; otherwise the run ends in ERROR with the reason
in ``/info``. The served model is fine-tuned when it was made for the studies' label set, images and
spacing, else a new model is trained for the whole set. The run's best checkpoint by validation Dice
(labels present in a reference or a prediction only) is copied atomically to the studies' own model
file whenever it improves on the served model's Dice on the same validation cases (a new model: on 0),
so a short or unlucky run never replaces a better model and an empty model is never published; the
shipped sample model is never written. The infer tasks pick the new file up (they reload on mtime
change) and the scoring method recomputes stale scores afterwards. Progress and results go to
``train_stats.json`` next to the model file, which ``stats()`` returns for ``/info`` (the keys 3D Slicer
reads: ``epoch``, ``total_epochs``, ``best_metric``, ``total_time`` once finished).
"""

from __future__ import annotations

import datetime
import inspect
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.utils.others.generic import name_to_device

from monai_segdiff import data as sd_data
from monai_segdiff import distributed
from monai_segdiff.config import NETWORKS, SegDiffConfig, load_checkpoint
from monai_segdiff.errors import CheckpointError, InputError
from monai_segdiff.io import copy_atomic, write_json
from monai_segdiff.labelset import label_names as studies_label_names
from monai_segdiff.networks import build_network
from monai_segdiff.tracking import TensorBoardCallback, run_dir
from monai_segdiff.training import (
    check_labels,
    fine_tune_mismatch,
    load_cases,
    new_config,
    split_validation,
    train,
    validation_dice,
)

from ..infers.segdiff import devices, truthy
from ..model import plain

logger = logging.getLogger(__name__)

TRACKING = ("none", "tensorboard")
LIBRARY_DEFAULTS = SegDiffConfig()  # network, channels ... of a new model follow the library's defaults
TRAIN_DEFAULTS = {k: p.default for k, p in inspect.signature(train).parameters.items()}


def available_networks(first: str) -> list[str]:
    """Networks the library can build here, ``first`` first (Slicer sends the first entry)."""
    import importlib.util

    found = [n for n in NETWORKS if n in ("concat", "unet") or importlib.util.find_spec(f"monai_segdiff.networks.{n}")]
    return [first] + [n for n in found if n != first]


def scratch_config(items: list[dict], labels: list[str], network: str) -> SegDiffConfig:
    """A new model's config, as ``segdiff train`` builds it (the library's ``new_config``)."""
    return new_config(items, labels, network=network)


def _number(value: Any, kind=float, default=None):
    try:
        return kind(float(value))
    except (TypeError, ValueError):
        return default


def _hms(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


class SegDiffTrain(TrainTask):
    """Fine-tune (``pretrained``) or train from scratch on the datastore's final labels.

    Args:
        model_path: where the run publishes its model (the studies' own model file).
        studies: the studies folder (for ``labels.json``); may be a URL for remote datastores.
        base_path: the model served while ``model_path`` does not exist yet (e.g. the shipped sample
            model): fine-tuned from when it fits, never written.
        network: network for training from scratch.
        device: default device.
        max_epochs: default epochs shown to clients.
        max_minutes: default time budget (0: none).
    """

    def __init__(
        self,
        model_path: str,
        studies: str,
        base_path: str | None = None,
        network: str = LIBRARY_DEFAULTS.network,
        device: str = "cpu",
        max_epochs: int = 10,
        max_minutes: float = 30.0,
        description: str = "Train / fine-tune the diffusion segmentation model on the final labels",
    ):
        super().__init__(description)
        self.model_path = os.path.abspath(model_path)
        self.base_path = os.path.abspath(base_path) if base_path else None
        self.studies = studies
        self.network = network
        self.device = device
        self.max_epochs = int(max_epochs)
        self.max_minutes = float(max_minutes)
        self.stats_path = os.path.join(os.path.dirname(self.model_path), "train_stats.json")

    def config(self) -> dict[str, Any]:
        # Slicer shows lists as combo boxes and sends their first entry: tracking stays off unless chosen.
        return {
            "max_epochs": self.max_epochs,
            "max_minutes": self.max_minutes,  # 0: no time limit
            "val_split": 0.2,
            "train_batch_size": int(TRAIN_DEFAULTS["batch_size"]),
            "learning_rate": float(TRAIN_DEFAULTS["lr"]),
            "iterations_per_epoch": 0,  # 0: automatic (one pass over the slices, 20..200)
            "pretrained": True,  # fine-tune the current model when its labels match
            "network": available_networks(self.network),  # used when training from scratch
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
        if stats.get("status") == "RUNNING":  # a run stopped from the client (DELETE /train/) or killed
            from monailabel.utils.async_tasks.utils import processes

            if not processes("train"):
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
        epochs = _number(req.get("max_epochs"), int, self.max_epochs) or None
        minutes = _number(req.get("max_minutes"), float, self.max_minutes) or None
        if epochs is None and minutes is None:
            epochs = self.max_epochs or 10
        val_split = min(max(_number(req.get("val_split"), float, 0.2), 0.0), 0.9)
        batch_size = max(1, _number(req.get("train_batch_size"), int, TRAIN_DEFAULTS["batch_size"]))
        lr = _number(req.get("learning_rate"), float, TRAIN_DEFAULTS["lr"]) or TRAIN_DEFAULTS["lr"]
        iterations = _number(req.get("iterations_per_epoch"), int, 0) or None
        device = name_to_device(req.get("device") or self.device)
        try:
            ranks = distributed.rank_devices(truthy(req.get("multi_gpu")), req.get("gpus"), str(device))
        except ValueError as e:
            raise MONAILabelException(MONAILabelError.INVALID_INPUT, str(e)) from e

        items = [dict(d, id=sd_data.image_id(d["image"])) for d in datastore.datalist()]
        try:
            if not items:
                raise InputError("no labelled image to train on: submit a final label first")
            labels = self.label_names(items)
            foreground = check_labels(items, labels)
            train_items, val_items = split_validation(items, foreground, val_split if len(items) > 1 else 0.0, seed=0)
            cfg, init_state, init = self.initial_model(items, truthy(req.get("pretrained")), str(req.get("network")), labels)
        except InputError as e:  # the run cannot be honest: ERROR with the reason, shown by /info
            self._write({"status": "ERROR", "error": str(e), "start_ts": int(start), "epoch": 0, "published": False,
                         "best_metric": None, "total_time": _hms(time.time() - start)})
            raise MONAILabelException(MONAILabelError.INVALID_INPUT, str(e)) from e
        baseline = self.baseline(cfg, init_state, val_items, device) if init_state is not None else None
        candidate = os.path.join(os.path.dirname(self.model_path), f".{os.path.basename(self.model_path)}.candidate")
        base = {
            "status": "RUNNING",
            "start_ts": int(start),
            "epoch": 0,
            "total_epochs": epochs or 1,
            "best_metric": 0.0,
            "best_metric_epoch": -1,
            "key_metric_name": "val_dice",
            "baseline_metric": baseline,
            "published": False,
            "init": init,
            "network": cfg.network,
            "labels": cfg.labels,
            "train_cases": len(train_items),
            "val_cases": len(val_items),
            "world_size": len(ranks),
            "model": self.model_path,
            "request": {k: req.get(k) for k in self.config()},
        }
        self._write({**base, "current_time": _hms(0)})
        writer = self.tracker(str(req.get("tracking", "none")))
        last_saved = [None]

        def on_epoch(s: dict) -> None:
            elapsed = time.time() - start
            total = epochs or max(s["epoch"], int(minutes * 60 / max(elapsed / s["epoch"], 1e-6)))
            best = s["best_dice"] if s["best_dice"] is not None and math.isfinite(s["best_dice"]) else 0.0
            base.update(
                epoch=s["epoch"], total_epochs=max(total, s["epoch"]), best_metric=max(best, 0.0),
                loss=s["loss"], val_dice=s["val_dice"], steps=s["step"],
            )
            saved = os.stat(candidate).st_mtime_ns if os.path.isfile(candidate) else None
            if saved is not None and saved != last_saved[0]:  # the library saved a new best checkpoint
                last_saved[0] = saved
                base["best_metric_epoch"] = s["epoch"]
                if s["best_dice"] > (baseline if baseline is not None else 0.0):  # better on foreground
                    if not base["published"]:
                        self.keep_replaced(init)
                    copy_atomic(candidate, self.model_path, keep_suffix=False)  # readers: old or new file
                    base["published"] = True
                    logger.info(f"epoch {s['epoch']}: published {self.model_path} (val_dice {best:.4f})")
            self._write({**base, "current_time": _hms(elapsed)})
            logger.info(f"epoch {s['epoch']}: loss {s['loss']:.4f} val_dice {s['val_dice']:.4f} best {best:.4f}")
            if writer is not None:
                writer(s)

        options = dict(output=candidate, epochs=epochs, max_minutes=minutes, batch_size=batch_size, lr=lr,
                       iterations_per_epoch=iterations, init_state=init_state, seed=0, callback=on_epoch)
        try:
            if len(ranks) > 1:  # DDP: rank 0 validates and saves; on_epoch runs here with its stats
                logger.info(f"Distributed training on {len(ranks)} processes: {ranks}")
                results = distributed.train_distributed(ranks, cfg, train_items, val_items, **options)
            else:
                results = [train(cfg, train_items, val_items, device=device, **options)]
            result = results[0]
        except (InputError, ValueError, distributed.DistributedError) as e:
            self._write({**base, "status": "ERROR", "error": str(e), "total_time": _hms(time.time() - start)})
            raise MONAILabelException(MONAILabelError.APP_TRAIN_FAILED, str(e)) from e
        finally:
            if writer is not None:
                writer.close()
            if os.path.exists(candidate):
                os.unlink(candidate)
        final = {
            **base,
            "status": "DONE",
            "epoch": result.epochs,
            "total_epochs": result.epochs,
            "total_time": _hms(time.time() - start),
            "seconds": round(time.time() - start, 2),
            "best_metric": result.best_dice if math.isfinite(result.best_dice) else base["best_metric"],
            "best_metric_epoch": result.best_epoch,
            "steps": result.steps,
            "rank_steps": [r.steps for r in results],
            "losses": result.losses,
            "val_dices": result.val_dice,
            "model_ts": os.stat(self.model_path).st_mtime if base["published"] else None,
        }
        if not base["published"]:
            final["note"] = (
                f"not published: best validation Dice {final['best_metric']:.4f} of this run did not beat the "
                f"current model's {baseline:.4f} on the same validation cases"
                if baseline is not None
                else "not published: no epoch found any of the labels on the validation cases (Dice 0)"
                if val_items
                else "not published: no validation case to check the model on (val_split 0)"
            )
            logger.warning(final["note"])
        self._write(final)
        logger.info(f"Training done: {json.dumps(plain(final))}")
        return plain(final)

    def baseline(self, cfg: SegDiffConfig, state: dict, val_items: list[dict], device: str) -> float | None:
        """Validation Dice of the model being fine-tuned (same cases, same metric as the run's):
        a run publishes only a model that beats it."""
        if not val_items:
            return None
        net = build_network(cfg).to(device)
        net.load_state_dict(state)
        dice = validation_dice(net, cfg, load_cases(val_items, cfg))
        logger.info(f"current model: validation Dice {dice:.4f} on {len(val_items)} case(s)")
        return dice if math.isfinite(dice) else None

    def label_names(self, items: list[dict]) -> list[str]:
        """The studies' foreground label names by value: ``labels.json`` (the label set the app keeps),
        else ``label1..labelK`` up to the largest stored value (a folder labelled before the set existed)."""
        studies = self.studies if self.studies and os.path.isdir(self.studies) else os.devnull
        return studies_label_names(studies, items)

    def source_model(self) -> str:
        """The model a run fine-tunes: the one published for these studies, else the base model served
        until then (e.g. the shipped sample model)."""
        if os.path.isfile(self.model_path) or not self.base_path:
            return self.model_path
        return self.base_path

    def initial_model(self, items: list[dict], pretrained: bool, network: str,
                      labels: list[str]) -> tuple[SegDiffConfig, dict | None, str]:
        """``(config, initial weights or None, "pretrained" | "scratch")``: fine-tune the served model
        when it was made for the studies' labels (same names in the same order), images and spacing;
        otherwise a new model for the studies' whole label set."""
        source = self.source_model()
        if pretrained and os.path.isfile(source):
            try:
                state, cfg, _ = load_checkpoint(source)
            except CheckpointError as e:
                logger.warning(f"cannot fine-tune ({e}); training from scratch")
            else:
                reason = fine_tune_mismatch(cfg, items, labels)
                if reason is None:
                    logger.info(f"Fine-tuning {source} ({cfg.network}, labels {cfg.labels})")
                    return cfg, state, "pretrained"
                logger.warning(f"not fine-tuning {source}: {reason}; training a new model")
        if network not in NETWORKS:
            raise InputError(f"unknown network {network!r}; use one of {', '.join(NETWORKS)}")
        logger.info(f"Training a new {network} model for labels {labels}")
        return scratch_config(items, labels, network), None, "scratch"

    def keep_replaced(self, init: str) -> None:
        """Before a new model (another label set) is first published over an existing file, keep that
        file as ``<model dir>/replaced/<name>-<mtime>.pt``: a model someone used is never lost."""
        if init != "scratch" or not os.path.isfile(self.model_path):
            return
        stem = Path(self.model_path).stem
        kept = Path(self.model_path).parent / "replaced" / f"{stem}-{int(os.stat(self.model_path).st_mtime)}.pt"
        copy_atomic(self.model_path, kept, keep_suffix=False)
        logger.info(f"kept the replaced model as {kept}")

    def tracker(self, tracking: str) -> TensorBoardCallback | None:
        """TensorBoard event files (loss, validation Dice, learning rate per epoch) in a new run folder
        under ``<model dir>/runs/`` when asked for; None otherwise."""
        if tracking.lower() not in ("tensorboard",):
            if tracking.lower() not in ("none", "", "false"):
                logger.warning(f"tracking {tracking!r} is not supported here; use 'none' or 'tensorboard'")
            return None
        try:
            import tensorboard  # noqa: F401  (SummaryWriter needs it)
        except ImportError:
            logger.warning("tensorboard is not installed; tracking disabled")
            return None
        return TensorBoardCallback(run_dir(os.path.join(os.path.dirname(self.model_path), "runs")))

    def _write(self, stats: dict) -> None:
        try:
            write_json(plain(stats), self.stats_path)
        except OSError as e:
            logger.warning(f"cannot write train stats {self.stats_path}: {e}")
