"""MONAI Bundle export: a checkpoint becomes a bundle folder that ``python -m monai.bundle run`` executes.

::

    DIR/configs/metadata.json    versions, labels (``channel_def``), data format, the model's config
    DIR/configs/inference.json   network_def, a ``Segmenter`` (the diffusion ensemble), the run loop
    DIR/models/model.pt          the checkpoint (``{"model", "config"}``: MONAI's ``CheckpointLoader``,
                                 MONAI Label and ``segdiff --model`` all read it)
    DIR/docs/README.md           what it is and how to run it

The run segments every image of ``dataset_dir`` (a folder, or one image file) and writes what
``segdiff infer`` writes to ``output_dir``: ``<name>_seg.nii.gz``, ``<name>_uncertainty.nii.gz``,
``<name>.json`` (and ``<name>.seg.nrrd`` with ``--seg_nrrd true``). The functions below the export
are the ones ``inference.json`` calls.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import __version__
from .atomic import umask
from .config import SegDiffConfig, load_checkpoint, save_checkpoint
from .data import case_id, datalist
from .errors import BundleError
from .io import is_picture, write_json, write_prediction
from .values import flag

__all__ = ["BundleError", "export_bundle", "inference_config", "load_checkpoint", "metadata", "segment_files",
           "with_weights"]

SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
BUNDLE_VERSION = "0.1.0"


# -- export ---------------------------------------------------------------------------------------
def export_bundle(checkpoint: str | os.PathLike, output: str | os.PathLike, name: str | None = None) -> Path:
    """Write the bundle of ``checkpoint`` to the folder ``output`` (new, or empty) and return it.

    The folder appears complete or not at all (written beside it, then renamed).
    """
    state, cfg, rest = load_checkpoint(checkpoint)
    out = Path(output).expanduser()
    if out.exists() and not out.is_dir():
        raise BundleError(f"output exists and is not a folder: {out}")
    if out.is_dir() and any(out.iterdir()):
        raise BundleError(f"output folder is not empty: {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        save_checkpoint(tmp / "models" / "model.pt", state, cfg)
        write_json(metadata(cfg, name or f"segdiff_{cfg.network}", rest), tmp / "configs" / "metadata.json")
        write_json(inference_config(cfg), tmp / "configs" / "inference.json")
        (tmp / "docs").mkdir()
        (tmp / "docs" / "README.md").write_text(readme(cfg, name or f"segdiff_{cfg.network}"))
        for path in [tmp, *tmp.rglob("*")]:  # mkdtemp / mkstemp make them private
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask())
        if out.is_dir():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def metadata(cfg: SegDiffConfig, name: str, rest: dict | None = None) -> dict[str, Any]:
    """``configs/metadata.json``: MONAI's bundle metadata (labels in ``channel_def``, which MONAI Label
    reads), plus the model's full config under ``segdiff_config``."""
    rest = rest or {}
    classes = {str(v): n for n, v in cfg.label_names.items()}
    spatial = ["*"] * int(getattr(cfg, "image_dims", 3))
    best = rest.get("best_dice")
    label_text = ", ".join(f"{v} is {n}" for n, v in cfg.label_names.items())
    return {
        "schema": SCHEMA,
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: f"exported by monai-segdiff {__version__}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"monai-segdiff": __version__},
        "name": name,
        "task": "Segmentation with uncertainty by a conditional diffusion model",
        "description": (
            f"{cfg.network} denoiser ({cfg.spatial_dims}D, prediction of {cfg.prediction_type}); the label map "
            f"fuses ({cfg.fusion}) an ensemble of {cfg.num_samples} DDIM samples of {cfg.sample_steps} steps, "
            f"the uncertainty map is the ensemble's {cfg.uncertainty}"
        ),
        "authors": "monai-segdiff",
        "copyright": "see the training data's licence",
        "intended_use": "research; not for clinical use",
        "data_type": "nibabel",
        "image_classes": f"{cfg.image_channels} channel(s); intensities mapped to [-1, 1] ({cfg.intensity})",
        "label_classes": f"label map: {label_text}",
        "pred_classes": f"label map: {label_text}",
        "eval_metrics": {"val_dice": float(best)} if isinstance(best, float) and math.isfinite(best) else {},
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image", "format": "magnitude", "modality": "CT/MR", "num_channels": cfg.image_channels,
                    "spatial_shape": spatial, "dtype": "float32", "value_range": [-1, 1], "is_patch_data": False,
                    "channel_def": {str(i): f"channel {i}" for i in range(cfg.image_channels)},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image", "format": "labels", "num_channels": 1, "spatial_shape": spatial,
                    "dtype": "uint8", "value_range": [0, cfg.num_classes - 1], "is_patch_data": False,
                    "channel_def": classes,
                }
            },
        },
        "segdiff_config": cfg.to_dict(),
    }


def inference_config(cfg: SegDiffConfig) -> dict[str, Any]:
    """``configs/inference.json``: every setting can be overridden on the ``monai.bundle run`` line
    (``--dataset_dir``, ``--output_dir``, ``--num_samples``, ``--steps``, ``--seed``, ``--device``,
    ``--seg_nrrd``)."""
    return {
        "imports": ["$import monai_segdiff.bundle as segdiff"],
        "bundle_root": ".",
        "checkpoint": "$@bundle_root + '/models/model.pt'",
        "dataset_dir": "$@bundle_root + '/data'",
        "output_dir": "$@bundle_root + '/eval'",
        "device": "$'cuda' if torch.cuda.is_available() else 'cpu'",
        "num_samples": cfg.num_samples,
        "steps": cfg.sample_steps,
        "seed": 0,
        "method": "ddim",
        "seg_nrrd": False,
        "progress": True,
        "checkpoint_data": "$segdiff.load_checkpoint(@checkpoint)",
        "segdiff_config": "$@checkpoint_data[1]",
        "network_def": {"_target_": "monai_segdiff.networks.build_network", "cfg": "@segdiff_config"},
        "network": "$segdiff.with_weights(@network_def, @checkpoint_data[0])",
        "segmenter": {
            "_target_": "monai_segdiff.segmenter.Segmenter",
            "net": "@network", "cfg": "@segdiff_config", "num_samples": "@num_samples", "steps": "@steps",
            "seed": "@seed", "method": "@method", "device": "@device",
        },
        "run": ["$segdiff.segment_files(@segmenter, @dataset_dir, @output_dir, @seg_nrrd, @progress)"],
    }


def readme(cfg: SegDiffConfig, name: str) -> str:
    """``docs/README.md``."""
    labels = ", ".join(f"`{n}` = {v}" for n, v in cfg.label_names.items())
    return f"""# {name}

Conditional diffusion segmentation with uncertainty (monai-segdiff {__version__}).

- network: `{cfg.network}`, {cfg.spatial_dims}D, predicts `{cfg.prediction_type}`
- labels: {labels}
- inference: ensemble of {cfg.num_samples} DDIM samples x {cfg.sample_steps} steps, fused by `{cfg.fusion}`;
  uncertainty map: `{cfg.uncertainty}` (0..1)
- images are reoriented to RAS, resampled to spacing {cfg.spacing} mm (<= 0 keeps the image's) and
  normalised ({cfg.intensity}); outputs are on the input's own grid

Research use only; not for clinical use.

## Run

Needs `pip install monai-segdiff` (the bundle's code). From any folder, with `BUNDLE` this folder:

```bash
python -m monai.bundle run --config_file BUNDLE/configs/inference.json --meta_file BUNDLE/configs/metadata.json \\
    --bundle_root BUNDLE --dataset_dir IMAGES_OR_ONE_IMAGE --output_dir OUT [--num_samples {cfg.num_samples}] \\
    [--steps {cfg.sample_steps}] [--seed 0] [--device cpu] [--seg_nrrd true]
```

For every image: `OUT/<name>_seg.nii.gz` (label map), `OUT/<name>_uncertainty.nii.gz`, `OUT/<name>.json`
(per-label volume and uncertainty statistics), and with `--seg_nrrd true` a 3D Slicer segmentation
`OUT/<name>.seg.nrrd`.

`models/model.pt` is a monai-segdiff checkpoint (`{{"model": state_dict, "config": ...}}`): it also works
with `segdiff infer --model` and as the MONAI Label app's `--conf model_path`.
"""


# -- called by inference.json ---------------------------------------------------------------------
def with_weights(net: nn.Module, state: dict) -> nn.Module:
    """``net`` with ``state`` loaded (strict), in eval mode."""
    net.load_state_dict(state)
    return net.eval()


def _inputs(dataset: str | os.PathLike) -> list[str | list[str]]:
    """The images of a folder (``data.datalist``: one entry per case) or one image file."""
    path = Path(dataset).expanduser()
    if path.is_file():
        return [str(path)]
    if not path.exists():
        raise BundleError(f"dataset_dir not found: {path} (give a folder of images or one image file)")
    return [item["image"] for item in datalist(path, with_raters=False)]


def segment_files(segmenter, dataset: str | os.PathLike, output_dir: str | os.PathLike,
                  seg_nrrd: bool | str = False, progress: bool | str = True) -> list[dict[str, str]]:
    """Segment every image of ``dataset`` with ``segmenter`` (a ``Segmenter``) and write the outputs of
    ``segdiff infer`` for each to ``output_dir``; returns ``[{kind: path}]`` per image."""
    images: Sequence = _inputs(dataset)
    out = Path(output_dir).expanduser()
    if flag(progress):
        images = tqdm(images, desc="segment", unit="image")
    written = []
    for image in images:
        pred = segmenter(image)
        name = case_id(image)
        first = image[0] if isinstance(image, list) else image
        files = write_prediction(pred.label, pred.uncertainty, out, name, picture=is_picture(first),
                                 seg_nrrd=segmenter.cfg.label_names if flag(seg_nrrd) else None)
        files["stats"] = write_json(dict(pred.stats, image=image, outputs={k: f.name for k, f in files.items()}),
                                    out / f"{name}.json")
        written.append({k: str(f) for k, f in files.items()})
    return written
