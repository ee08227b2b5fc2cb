"""One image in, label map + uncertainty map + statistics out, on the input's own grid.

The single inference path used by the CLI, the MONAI Label app, evaluation and scoring:
load -> RAS + spacing + normalisation -> ensemble inferer -> uncertainty -> resample back.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from monai.data import MetaTensor
from monai.transforms import LoadImage, ResampleToMatch
from torch import nn

from . import uncertainty as unc
from .config import SegDiffConfig, load_checkpoint
from .diffusion.inferer import EnsembleOutput, SegDiffInferer
from .diffusion.sampler import build_sampler
from .networks import build_network
from .transforms import InputError, apply, preprocess_transforms


@dataclass
class Prediction:
    """Result of one image. ``label``/``uncertainty`` are on the input grid; the rest on the
    preprocessed (RAS, resampled) grid."""

    label: MetaTensor  # [1, *spatial] uint8
    uncertainty: MetaTensor  # [1, *spatial] float32 in [0, 1]
    ensemble: EnsembleOutput
    preprocessed: MetaTensor
    stats: dict = field(default_factory=dict)


def load_image(path: str | Path) -> MetaTensor:
    """Read any image MONAI's ``LoadImage`` reads, channel first; ``InputError`` if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image not found: {path}")
    try:
        img = LoadImage(image_only=True, ensure_channel_first=True)(str(path))
    except Exception as e:  # readers raise many types for a broken file
        raise InputError(f"cannot read image {path}: {str(e).splitlines()[0][:200]}") from e
    return img


def check_image(img: MetaTensor, cfg: SegDiffConfig) -> None:
    """Clear errors for images this model cannot segment."""
    spatial = img.shape[1:]
    if len(spatial) not in (2, 3):
        raise InputError(f"expected a 2D or 3D image, got {len(spatial)} spatial dimensions {tuple(spatial)}")
    if len(spatial) == 2 and cfg.spatial_dims == 3:
        raise InputError("this is a 3D model; the image is 2D")
    if img.shape[0] != cfg.image_channels:
        raise InputError(f"the model expects {cfg.image_channels} image channel(s), the image has {img.shape[0]}")
    if min(spatial) < 1 or math.prod(spatial) < 8:
        raise InputError(f"image too small: {tuple(spatial)}")


class Segmenter:
    """Ensemble segmentation of whole images with a trained network.

    Args:
        net: trained network (denoiser or baseline UNet).
        cfg: its config.
        num_samples: ensemble size N (default from the config).
        steps: sampling steps (default from the config).
        seed: noise seed; the same seed gives the same result.
        method: ``ddim`` (few steps) or ``ddpm`` (all training steps).
        max_batch_pixels: bound on voxels per network call (memory).
        device: torch device.
        progress: progress bars.
    """

    def __init__(
        self,
        net: nn.Module,
        cfg: SegDiffConfig,
        num_samples: int | None = None,
        steps: int | None = None,
        seed: int | None = 0,
        method: str = "ddim",
        max_batch_pixels: int = 2**20,
        device: str | torch.device = "cpu",
        progress: bool = False,
        uncertainty: str | None = None,
        threshold: float = 0.5,
    ) -> None:
        self.cfg, self.device = cfg, torch.device(device)
        self.net = net.to(self.device).eval()
        self.num_samples = cfg.num_samples if num_samples is None else int(num_samples)
        if self.num_samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.num_samples}")
        self.sampler = build_sampler(cfg, steps=steps, method=method)
        self.uncertainty_kind = uncertainty or cfg.uncertainty
        self.threshold = threshold
        self.inferer = SegDiffInferer(
            self._members,
            num_samples=self.num_samples,
            num_classes=cfg.num_classes,
            spatial_dims=cfg.spatial_dims,
            context=cfg.context,
            divisor=cfg.divisor,
            max_batch_pixels=max_batch_pixels,
            roi_size=cfg.roi_size if cfg.spatial_dims == 3 else None,
            seed=seed,
            progress=progress,
        )
        self.preprocess = preprocess_transforms(cfg, load=False)

    @classmethod
    def from_checkpoint(cls, path: str | Path, **kwargs) -> "Segmenter":
        state, cfg, _ = load_checkpoint(path)
        net = build_network(cfg)
        net.load_state_dict(state)
        return cls(net, cfg, **kwargs)

    def _members(self, net: nn.Module, batch: torch.Tensor, n: int, gen: torch.Generator | None) -> torch.Tensor:
        return self.sampler.probabilities(net, batch.to(self.device), n, gen).float().cpu()

    def ensemble(self, preprocessed: torch.Tensor) -> EnsembleOutput:
        """Run the ensemble on an already preprocessed image ``[C, *spatial]``."""
        return self.inferer(preprocessed, self.net)

    def __call__(self, image: str | Path | MetaTensor) -> Prediction:
        t0 = time.perf_counter()
        img = load_image(image) if isinstance(image, (str, Path)) else image
        if not isinstance(img, MetaTensor):
            img = MetaTensor(img)
        check_image(img, self.cfg)
        if img.ndim - 1 == 2 and self.cfg.spatial_dims == 2:
            pre = self._preprocess_2d(img)
        else:
            pre = apply(self.preprocess, {"image": img})["image"]
        t1 = time.perf_counter()
        out = self.ensemble(pre)
        t2 = time.perf_counter()
        umap = unc.uncertainty_map(self.uncertainty_kind, out.probs, out.samples, out.expected_entropy)
        label_pre = unc.fuse(out.probs, out.samples, method=self.cfg.fusion, num_classes=self.cfg.num_classes)
        label, umap_orig = self._to_input_grid(out.probs, umap, label_pre, pre, img)
        t3 = time.perf_counter()
        spacing = [float(s) for s in pre.pixdim[: pre.ndim - 1]] if hasattr(pre, "pixdim") else [1.0]
        stats = {
            "label_names": self.cfg.label_names,
            "labels": unc.label_statistics(
                label_pre, umap, out.samples, {n: v for n, v in self.cfg.label_names.items() if v > 0},
                voxel_volume_mm3=float(math.prod(spacing)), threshold=self.threshold,
            ),
            "case_score": unc.case_score(umap, out.probs, out.samples),
            "uncertainty": self.uncertainty_kind,
            "samples": self.num_samples,
            "steps": getattr(self.sampler, "num_evaluations", 1),
            "network": self.cfg.network,
            "timings": {"preprocess_s": t1 - t0, "ensemble_s": t2 - t1, "postprocess_s": t3 - t2, "total_s": t3 - t0},
        }
        return Prediction(label, umap_orig, out, pre, stats)

    def _preprocess_2d(self, img: MetaTensor) -> MetaTensor:
        from .transforms import CheckFinited, intensity_transform

        d = apply(CheckFinited(["image"]), {"image": img.float()})
        return intensity_transform(self.cfg)(d)["image"]

    def _to_input_grid(self, probs, umap, label_pre, pre: MetaTensor, img: MetaTensor):
        """Resample probabilities and the uncertainty map from the working grid to the input's."""
        if pre.shape[1:] == img.shape[1:] and torch.allclose(pre.affine.double(), img.affine.double(), atol=1e-4):
            label, u = label_pre[None].to(torch.uint8), umap[None].float()
        else:
            resample = ResampleToMatch(mode="bilinear", padding_mode="border")
            u = resample(MetaTensor(umap[None], affine=pre.affine), img_dst=img)
            if self.cfg.fusion == "mean":  # argmax of resampled probabilities: smooth boundaries
                p = resample(MetaTensor(probs, affine=pre.affine), img_dst=img)
                label = p.argmax(0, keepdim=True).to(torch.uint8)
            else:
                nearest = ResampleToMatch(mode="nearest", padding_mode="border")
                label = nearest(MetaTensor(label_pre[None].float(), affine=pre.affine), img_dst=img).to(torch.uint8)
        meta = dict(img.meta)
        return MetaTensor(torch.as_tensor(label), meta=meta), MetaTensor(torch.as_tensor(u).float(), meta=meta)

