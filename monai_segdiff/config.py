"""One configuration object for model, diffusion and data, stored inside every checkpoint, and the
option vocabularies it is checked against.

A checkpoint is ``{"model": state_dict, "config": SegDiffConfig.to_dict()}`` and loads with
``torch.load(weights_only=True)``: everything here is a plain Python type.

The names an option may take (networks, augmentations, clean-up operations, fusion methods,
uncertainty maps, the number of test-time flip views) live here, at the bottom of the package, with
their parsers: the modules that implement the options (``transforms``, ``postprocess``, ``tta``,
``uncertainty``) import them from here, so checking a config never reaches up into them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_write
from .errors import CheckpointError

NETWORKS = ("concat", "medsegdiff", "medsegdiff_v2", "dermosegdiff", "cimd", "unet")
#: networks with the optional anchor head, switched by ``extra[network]["anchor"]`` (on for a new model)
ANCHORED_NETWORKS = ("medsegdiff", "medsegdiff_v2")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
INTENSITY_MODES = ("percentile", "ct")
#: training augmentations, in the order they are applied (``transforms.AUGMENTATIONS`` builds them)
AUGMENT_OPTIONS = ("flip", "intensity", "noise")
#: clean-up of the fused mask, in the order it is applied (``postprocess.PostProcess`` runs it)
POSTPROCESS_OPTIONS = ("median", "confident_component", "largest_component", "fill_holes")
#: how ensemble members are fused into one label map (``uncertainty.fuse``)
FUSION_METHODS = ("mean", "vote", "staple")
#: voxel uncertainty maps (``uncertainty.uncertainty_map``)
UNCERTAINTY_KINDS = ("entropy", "mutual_information", "variance", "disagreement")


def _option_names(value: str | Sequence[str] | None, normalise: Callable[[str], str]) -> list[str]:
    """``"a,b"`` or a list -> normalised names without empty entries and ``none``."""
    if value is None:
        return []
    names = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    names = [normalise(n) for n in names]
    return [n for n in names if n and n != "none"]


def parse_augment(value: str | Sequence[str] | None) -> list[str]:
    """``"noise,flip"`` or a list -> augmentation names in ``AUGMENT_OPTIONS`` order; ``""``, ``"none"``
    or ``None`` -> ``[]``. ``ValueError`` with a one-line reason for an unknown name."""
    names = _option_names(value, lambda n: n.strip().lower())
    if unknown := sorted(set(names) - set(AUGMENT_OPTIONS)):
        raise ValueError(f"unknown augment option(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(AUGMENT_OPTIONS)} or none")
    return [n for n in AUGMENT_OPTIONS if n in names]


def parse_postprocess(value: str | Sequence[str] | None) -> list[str]:
    """``"fill_holes,median"`` or a list -> the options in application order; ``""``, ``"none"`` or
    ``None`` -> ``[]``. ``ValueError`` with a one-line reason for an unknown name."""
    names = _option_names(value, lambda n: n.strip().lower().replace("-", "_"))
    unknown = sorted(set(names) - set(POSTPROCESS_OPTIONS))
    if unknown:
        raise ValueError(
            f"unknown postprocess option(s) {', '.join(unknown)}; choose from {', '.join(POSTPROCESS_OPTIONS)}"
        )
    return [n for n in POSTPROCESS_OPTIONS if n in names]


def max_tta_flips(spatial_dims: int) -> int:
    """Distinct test-time mirror views of a ``spatial_dims``-D batch (identity included): 4 in 2D, 8 in 3D."""
    return 2**spatial_dims


def check_tta_flips(spatial_dims: int, count: int) -> None:
    """``ValueError`` unless ``count`` mirror views exist in ``spatial_dims`` D (1..``max_tta_flips``)."""
    if not 1 <= count <= max_tta_flips(spatial_dims):
        raise ValueError(f"tta_flips must be in 1..{max_tta_flips(spatial_dims)} for {spatial_dims}D, got {count}")


def size_divisor(channels: list[int], network: str, extra: dict[str, Any]) -> int:
    """One halving per level below the top, one more with a strided image-path stem (MedSegDiff's and
    MedSegDiff-V2's ``image_stride``, under ``extra[network]``)."""
    stride = int(dict(extra.get(network) or {}).get("image_stride", 1))
    return 2 ** (len(channels) - 1) * stride


@dataclass
class SegDiffConfig:
    """Everything needed to rebuild a network and run it on a new image.

    Args:
        labels: foreground label names; label value = position + 1, 0 is background.
        network: one of ``NETWORKS``.
        spatial_dims: 2 runs on slices (2D / 2.5D) or on 2D images, 3 on 3D patches.
        image_dims: the data the model is trained on: 3 = volumes (a 2D model slices them), 2 = 2D images
            (PNG/JPG, 2D NIfTI) segmented whole, without slicing; needs ``spatial_dims`` 2 and ``context`` 0.
        image_channels: channels of the input image (modalities / RGB).
        context: neighbouring slices on each side added as channels in 2.5D mode.
        channels: feature channels per level of the denoiser.
        num_res_blocks: residual blocks per level.
        attention_levels: self-attention per level (costly on CPU at high resolution).
        num_head_channels: channels per attention head.
        norm_num_groups: group-norm groups; every entry of ``channels`` must be a multiple.
        dropout: dropout of the baseline UNet (used for MC-dropout).
        spacing: target voxel spacing in mm; a value <= 0 keeps the image's own spacing on that axis.
        slice_axis: axis (0, 1, 2 of the RAS volume) that 2D mode slices along; 2 = axial.
        roi_size: training patch size (in-plane size for 2D, patch size for 3D).
        intensity: ``percentile`` (robust, CT and MRI) or ``ct`` (fixed Hounsfield window).
        percentiles: lower/upper percentile mapped to [-1, 1] in ``percentile`` mode.
        ct_window: Hounsfield window mapped to [-1, 1] in ``ct`` mode.
        prediction_type: denoiser target, ``epsilon``, ``sample`` (x0) or ``v_prediction``.
        train_timesteps: length of the diffusion chain in training.
        beta_schedule: MONAI scheduler schedule name.
        sample_steps: default DDIM steps at inference.
        num_samples: default ensemble size at inference.
        eta: DDIM eta (0 = deterministic given the initial noise).
        aux_dice_weight: weight of the auxiliary Dice loss on the predicted x0.
        foreground_fraction: share of training slices/patches centred on foreground.
        augment: training augmentations of each sample (``flip``, ``intensity``, ``noise``; see
            ``AUGMENT_OPTIONS``); empty: none.
        uncertainty: voxel map written by infer (``entropy``, ``mutual_information``, ...).
        fusion: how members are fused into one label map (``mean``, ``vote``, ``staple``).
        anchor_share: share of a deterministic anchor prediction (MedSegDiff's anchor head) in the
            fused probabilities, next to the diffusion members (0: members only; no effect without
            the head). 0.5 raised lesion Dice 0.60 -> 0.63 on 120 fresh phantoms (BENCHMARKS.md).
        tta_flips: test-time mirror views averaged into each ensemble member (1: none; 2D up to 4,
            3D up to 8; see ``monai_segdiff.tta``). Costs as many network runs per member.
        postprocess: default clean-up of the fused mask (``median``, ``confident_component``,
            ``largest_component``, ``fill_holes``; see ``monai_segdiff.postprocess``); empty: none.
        click_channels: the network also sees one guidance channel per class (the annotator's clicks,
            ``monai_segdiff.clicks.guidance``) and was trained with simulated clicks (DeepEdit's recipe,
            ``monai_segdiff.interaction``); without clicks the channels are zero.
    """

    labels: list[str] = field(default_factory=lambda: ["foreground"])
    network: str = "medsegdiff"
    spatial_dims: int = 2
    image_dims: int = 3
    image_channels: int = 1
    context: int = 1
    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 64])
    num_res_blocks: int = 1
    attention_levels: list[bool] = field(default_factory=lambda: [False, False, False, False])
    num_head_channels: int = 32
    norm_num_groups: int = 16
    dropout: float = 0.1
    spacing: list[float] = field(default_factory=lambda: [1.5, 1.5, -1.0])
    slice_axis: int = 2
    roi_size: list[int] = field(default_factory=lambda: [96, 96])
    intensity: str = "percentile"
    percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])
    ct_window: list[float] = field(default_factory=lambda: [-1000.0, 1000.0])
    prediction_type: str = "sample"
    train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear_beta"
    sample_steps: int = 4
    num_samples: int = 5
    eta: float = 0.0
    aux_dice_weight: float = 1.0
    foreground_fraction: float = 0.7
    augment: list[str] = field(default_factory=lambda: ["flip", "intensity", "noise"])
    uncertainty: str = "entropy"
    fusion: str = "mean"
    anchor_share: float = 0.5
    tta_flips: int = 1
    postprocess: list[str] = field(default_factory=list)
    click_channels: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # -- derived values -------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """Classes including background."""
        return len(self.labels) + 1

    @property
    def label_names(self) -> dict[str, int]:
        """MONAI Label style ``{name: value}``, background included."""
        return {"background": 0, **{name: i + 1 for i, name in enumerate(self.labels)}}

    @property
    def in_channels(self) -> int:
        """Image channels the network sees (2.5D context slices included)."""
        extra = 2 * self.context if self.spatial_dims == 2 else 0
        return self.image_channels * (1 + extra)

    @property
    def guidance_channels(self) -> int:
        """Click guidance channels after the image channels (one per class, or none)."""
        return self.num_classes if self.click_channels else 0

    @property
    def network_channels(self) -> int:
        """Input channels of the network's image path: image (with context) + guidance."""
        return self.in_channels + self.guidance_channels

    @property
    def is_diffusion(self) -> bool:
        return self.network != "unet"

    # -- checks ---------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ``ValueError`` with a one-line reason on any inconsistent setting."""
        errors = []
        if self.network not in NETWORKS:
            errors.append(f"network must be one of {', '.join(NETWORKS)}, got {self.network!r}")
        if self.spatial_dims not in (2, 3):
            errors.append(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        if not self.labels or len(set(self.labels)) != len(self.labels):
            errors.append("labels must be a non-empty list of distinct names")
        elif len(self.labels) > 255:
            errors.append(f"at most 255 labels (label maps are 8-bit), got {len(self.labels)}")
        if self.prediction_type not in PREDICTION_TYPES:
            errors.append(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}")
        if self.intensity not in INTENSITY_MODES:
            errors.append(f"intensity must be one of {', '.join(INTENSITY_MODES)}")
        if any(c % self.norm_num_groups for c in self.channels):
            errors.append(f"channels {self.channels} must be multiples of norm_num_groups {self.norm_num_groups}")
        if len(self.attention_levels) != len(self.channels):
            errors.append("attention_levels needs one entry per level of channels")
        if len(self.roi_size) != self.spatial_dims:
            errors.append(f"roi_size needs {self.spatial_dims} entries for spatial_dims {self.spatial_dims}")
        elif any(s % self.divisor for s in self.roi_size):
            errors.append(f"roi_size {self.roi_size} must be divisible by {self.divisor}")
        if self.sample_steps < 1 or self.sample_steps > self.train_timesteps:
            errors.append(f"sample_steps must be in 1..{self.train_timesteps}, got {self.sample_steps}")
        if self.num_samples < 1:
            errors.append(f"num_samples must be >= 1, got {self.num_samples}")
        if not 0.0 <= self.anchor_share <= 1.0:
            errors.append(f"anchor_share must be in [0, 1], got {self.anchor_share}")
        if self.spatial_dims in (2, 3):
            try:
                check_tta_flips(self.spatial_dims, self.tta_flips)
            except ValueError as e:
                errors.append(str(e))
        if self.image_dims not in (2, 3):
            errors.append(f"image_dims must be 2 or 3, got {self.image_dims}")
        elif self.image_dims == 2 and (self.spatial_dims != 2 or self.context != 0):
            errors.append("2D images (image_dims 2) need spatial_dims 2 and context 0")
        if self.image_channels < 1 or self.context < 0:
            errors.append("image_channels must be >= 1 and context >= 0")
        if len(self.spacing) != 3:
            errors.append("spacing needs 3 values (mm; <= 0 keeps the image's spacing)")
        try:
            self.postprocess = parse_postprocess(self.postprocess)
        except ValueError as e:
            errors.append(str(e))
        try:
            self.augment = parse_augment(self.augment)
        except ValueError as e:
            errors.append(str(e))
        if errors:
            raise ValueError("; ".join(errors))

    @property
    def divisor(self) -> int:
        """Spatial sizes must be divisible by this."""
        return size_divisor(self.channels, self.network, self.extra)

    # -- plain-type round trip ------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SegDiffConfig":
        """Build from a dict; unknown keys go to ``extra`` so newer checkpoints still load."""
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = dict(kwargs.pop("extra", {}) or {})
        extra.update({k: v for k, v in data.items() if k not in known})
        return cls(**kwargs, extra=extra)

    def replace(self, **changes: Any) -> "SegDiffConfig":
        return dataclasses.replace(self, **changes)


def save_checkpoint(path: str | os.PathLike, state_dict: dict, config: SegDiffConfig, **extra: Any) -> Path:
    """Write ``{"model", "config", **extra}`` atomically (temp file + rename)."""
    payload = {"model": {k: v.detach().cpu() for k, v in state_dict.items()}, "config": config.to_dict(), **extra}
    return atomic_write(path, lambda tmp: torch.save(payload, tmp), keep_suffix=False)


def load_checkpoint(path: str | os.PathLike) -> tuple[dict, SegDiffConfig, dict]:
    """Return ``(state_dict, config, rest)``; raise ``CheckpointError`` for anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a corrupt or foreign file
        raise CheckpointError(f"not a readable monai-segdiff checkpoint: {path} ({type(e).__name__})") from e
    if not isinstance(payload, dict) or "model" not in payload or "config" not in payload:
        raise CheckpointError(f"not a monai-segdiff checkpoint (needs 'model' and 'config'): {path}")
    try:
        config = SegDiffConfig.from_dict(payload["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} has an invalid config: {e}") from e
    rest = {k: v for k, v in payload.items() if k not in ("model", "config")}
    return payload["model"], config, rest


def training_state_path(checkpoint: str | os.PathLike) -> Path:
    """The resume state kept beside a checkpoint: ``<checkpoint>.state``.

    It has the checkpoint format (``model`` = the raw, not averaged, weights) plus ``ema``,
    ``optimizer``, ``scheduler``, ``epoch``, ``step``, best score and random-generator states, so the
    model file itself stays small (weights + config) for shipping and serving.
    """
    return Path(f"{os.fspath(checkpoint)}.state")
