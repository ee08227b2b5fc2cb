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
from monai.transforms import ResampleToMatch
from torch import nn

from . import uncertainty as unc
from .config import SegDiffConfig, load_checkpoint
from .diffusion.inferer import EnsembleOutput, SegDiffInferer
from .diffusion.sampler import build_sampler
from .errors import InputError
from .io import ImageFiles, load_image, load_label  # noqa: F401  (load_label: importable from here too)
from .networks import build_network
from .postprocess import PostProcess
from .transforms import apply, destination_slabs, preprocess_transforms
from .tta import flip_views, with_flips


@dataclass
class Prediction:
    """Result of one image. ``label``/``uncertainty`` are on the input grid; the rest on the
    preprocessed (RAS, resampled) grid."""

    label: MetaTensor  # [1, *spatial] uint8
    uncertainty: MetaTensor  # [1, *spatial] float32 in [0, 1]
    ensemble: EnsembleOutput
    preprocessed: MetaTensor
    stats: dict = field(default_factory=dict)


def check_image(img: MetaTensor, cfg: SegDiffConfig) -> None:
    """Clear errors for images this model cannot segment."""
    spatial = img.shape[1:]
    if len(spatial) not in (2, 3):
        raise InputError(f"expected a 2D or 3D image, got {len(spatial)} spatial dimensions {tuple(spatial)}")
    if len(spatial) == 2 and cfg.spatial_dims == 3:
        raise InputError("this is a 3D model; the image is 2D")
    if img.shape[0] != cfg.image_channels:
        raise InputError(
            f"the model expects {cfg.image_channels} image channel(s), the image has {img.shape[0]} "
            f"(give every channel: a multi-channel file, or one file per channel)"
        )
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
        uncertainty: voxel uncertainty measure (default from the config).
        threshold: uncertainty above which a voxel counts as uncertain in the statistics.
        postprocess: clean-up of the fused mask, e.g. ``"largest_component,fill_holes"`` or a list
            (default from the config; ``"none"`` or ``[]`` turns the config's off).
        tta_flips: test-time mirror views per member (default from the config; 1: none).
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
        postprocess: str | list[str] | None = None,
        tta_flips: int | None = None,
    ) -> None:
        self.cfg, self.device = cfg, torch.device(device)
        self.net = net.to(self.device).eval()
        self.num_samples = cfg.num_samples if num_samples is None else int(num_samples)
        if self.num_samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.num_samples}")
        self.sampler = build_sampler(cfg, steps=steps, method=method)
        self.uncertainty_kind = uncertainty or cfg.uncertainty
        self.threshold = threshold
        self.postprocess = PostProcess(
            cfg.postprocess if postprocess is None else postprocess, cfg.num_classes,
            on_probabilities=cfg.fusion == "mean",
        )
        self.tta_flips = cfg.tta_flips if tta_flips is None else int(tta_flips)
        views = flip_views(cfg.spatial_dims, self.tta_flips)
        self.inferer = SegDiffInferer(
            with_flips(self._members, views),
            num_samples=self.num_samples,
            num_classes=cfg.num_classes,
            spatial_dims=cfg.spatial_dims,
            context=cfg.context,
            divisor=cfg.divisor,
            max_batch_pixels=max_batch_pixels,
            roi_size=cfg.roi_size if cfg.spatial_dims == 3 else None,
            seed=seed,
            progress=progress,
            anchor_share=cfg.anchor_share,
        )
        # 2D images are preprocessed in-plane and kept 2D; volumes in 3D (sliced by a 2D network later)
        self.preprocess = {dims: preprocess_transforms(cfg, load=False, image_dims=dims) for dims in (2, 3)}

    @classmethod
    def from_checkpoint(cls, path: str | Path, **kwargs) -> "Segmenter":
        state, cfg, _ = load_checkpoint(path)
        net = build_network(cfg)
        net.load_state_dict(state)
        return cls(net, cfg, **kwargs)

    def _members(self, net: nn.Module, batch: torch.Tensor, n: int, gen: torch.Generator | None) -> tuple:
        p, anchor = self.sampler.members_and_anchor(net, batch.to(self.device), n, gen)
        return p.float().cpu(), (None if anchor is None else anchor.float().cpu())

    def ensemble(self, preprocessed: torch.Tensor) -> EnsembleOutput:
        """Run the ensemble on an already preprocessed image ``[C, *spatial]``."""
        return self.inferer(preprocessed, self.net)

    def __call__(self, image: ImageFiles | MetaTensor) -> Prediction:
        """Segment an image file (or one file per channel) or a loaded ``[C, *spatial]`` image."""
        t0 = time.perf_counter()
        img = image if isinstance(image, torch.Tensor) else load_image(image)
        if not isinstance(img, MetaTensor):
            img = MetaTensor(img)
        t_load = time.perf_counter()
        check_image(img, self.cfg)
        pre = apply(self.preprocess[img.ndim - 1], {"image": img.float()})["image"]
        t_pre = time.perf_counter()
        out = self.ensemble(pre)
        t_ens = time.perf_counter()
        umap = unc.uncertainty_map(self.uncertainty_kind, out.probs, out.samples, out.expected_entropy)
        t_unc = time.perf_counter()
        probs = self.postprocess.select(out.probs, self.postprocess.smooth(out.probs))
        label_pre = unc.fuse(probs, out.samples, method=self.cfg.fusion, num_classes=self.cfg.num_classes)
        label_pre = label_pre.to(torch.uint8)  # class indices < 256 (a CT-sized int64 map is 0.3 GiB)
        label_pre = self.postprocess.clean(label_pre)
        t_post = time.perf_counter()
        label, umap_orig = self._to_input_grid(probs, umap, label_pre, pre, img)
        t_back = time.perf_counter()
        if self.postprocess:  # resampling to the input grid can bring back specks or holes
            label = MetaTensor(self.postprocess.clean(label[0], median=False)[None], meta=label.meta)
        t_clean = time.perf_counter()
        spacing = [float(s) for s in pre.pixdim[: pre.ndim - 1]] if hasattr(pre, "pixdim") else [1.0]
        stats = {
            "label_names": self.cfg.label_names,
            "labels": unc.label_statistics(
                label_pre, umap, out.samples, {n: v for n, v in self.cfg.label_names.items() if v > 0},
                voxel_volume_mm3=float(math.prod(spacing)), threshold=self.threshold,
            ),
            "case_score": unc.case_score(umap, out.probs, out.samples),
            "uncertainty": self.uncertainty_kind,
            "postprocess": list(self.postprocess.ops),
            "samples": self.num_samples,
            "tta_flips": self.tta_flips,
            "steps": getattr(self.sampler, "num_evaluations", 1),
            "network": self.cfg.network,
        }
        t_end = time.perf_counter()
        # seconds per stage: reading the file, RAS + spacing + intensity, the network ensemble, the
        # uncertainty map, the clean-up (both passes), resampling back to the input grid, statistics
        stats["timings"] = {
            "load_s": t_load - t0, "preprocess_s": t_pre - t_load, "ensemble_s": t_ens - t_pre,
            "uncertainty_s": t_unc - t_ens, "postprocess_s": (t_post - t_unc) + (t_clean - t_back),
            "resample_s": t_back - t_post, "statistics_s": t_end - t_clean, "total_s": t_end - t0,
        }
        return Prediction(label, umap_orig, out, pre, stats)

    def _to_input_grid(self, probs, umap, label_pre, pre: MetaTensor, img: MetaTensor):
        """Resample probabilities and the uncertainty map from the working grid to the input's."""
        if pre.shape[1:] == img.shape[1:] and torch.allclose(pre.affine.double(), img.affine.double(), atol=1e-4):
            label, u = label_pre[None].to(torch.uint8), umap[None].float()
        else:
            label = torch.zeros(1, *img.shape[1:], dtype=torch.uint8)
            u = torch.zeros(1, *img.shape[1:], dtype=torch.float32)
            linear = ResampleToMatch(mode="bilinear", padding_mode="border")
            nearest = ResampleToMatch(mode="nearest", padding_mode="border")
            src_u, src_p = MetaTensor(umap[None], affine=pre.affine), MetaTensor(probs, affine=pre.affine)
            src_l = None if self.cfg.fusion == "mean" else MetaTensor(label_pre[None].float(), affine=pre.affine)
            for z, dst in destination_slabs(img.shape[1:], img.affine):
                u[..., z] = linear(src_u, img_dst=dst)[0].as_tensor()
                if self.cfg.fusion == "mean":  # argmax of resampled probabilities: smooth boundaries
                    label[..., z] = linear(src_p, img_dst=dst).as_tensor().argmax(0).to(torch.uint8)
                else:
                    label[..., z] = nearest(src_l, img_dst=dst)[0].as_tensor().to(torch.uint8)
        meta = dict(img.meta)
        return MetaTensor(torch.as_tensor(label), meta=meta), MetaTensor(torch.as_tensor(u).float(), meta=meta)
