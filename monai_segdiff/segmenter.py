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

from . import selection
from . import uncertainty as unc
from .clicks import Clicks, click_region, follow_clicks, guidance, within_reach
from .config import SegDiffConfig, load_checkpoint
from .diffusion.inferer import EnsembleOutput, SegDiffInferer, context_slices, pad_to_multiple
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
    fused: torch.Tensor | None = None  # [K, *spatial] class probabilities after the clean-up
    label_work: torch.Tensor | None = None  # [*spatial] uint8 label map before resampling back


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
        follow: carry each click to the region around it the ensemble left open
            (:func:`monai_segdiff.clicks.follow_clicks`); off: only the clicks' held neighbourhoods.
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
        follow: bool = True,
    ) -> None:
        self.cfg, self.device = cfg, torch.device(device)
        self.follow = bool(follow)
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
        # MC dropout draws its masks from the generator: no initial noise is drawn for it
        self.inferer.takes_noise = self.inferer.takes_noise and cfg.is_diffusion
        # 2D images are preprocessed in-plane and kept 2D; volumes in 3D (sliced by a 2D network later)
        self.preprocess = {dims: preprocess_transforms(cfg, load=False, image_dims=dims) for dims in (2, 3)}

    @classmethod
    def from_checkpoint(cls, path: str | Path, **kwargs) -> "Segmenter":
        state, cfg, _ = load_checkpoint(path)
        net = build_network(cfg)
        net.load_state_dict(state)
        return cls(net, cfg, **kwargs)

    @torch.inference_mode()
    def features(self, image: ImageFiles | MetaTensor) -> torch.Tensor:
        """One vector per image from the network's image path, for diversity-aware selection
        (:mod:`monai_segdiff.selection`): every tensor :meth:`condition` gives, averaged over space (and
        over the slices of a slice model), concatenated. Needs a network with an image path (diffusion)."""
        if not hasattr(self.net, "condition"):
            raise ValueError(f"a {self.cfg.network} network has no image path to take features from")
        img = image if isinstance(image, torch.Tensor) else load_image(image)
        img = img if isinstance(img, MetaTensor) else MetaTensor(img)
        check_image(img, self.cfg)
        pre = apply(self.preprocess[img.ndim - 1], {"image": img.float()})["image"]
        pre = pre.as_tensor().float() if isinstance(pre, MetaTensor) else torch.as_tensor(pre).float()
        if self.cfg.spatial_dims == 2:
            batch = context_slices(pre if pre.ndim == 4 else pre[..., None], self.cfg.context)
            batch = pad_to_multiple(batch, self.cfg.divisor, 2)[0]
        else:
            batch = pad_to_multiple(pre[None], self.cfg.divisor, 3)[0]
        if self.cfg.guidance_channels:  # a click-trained network without clicks: zero guidance
            batch = torch.cat([batch, batch.new_zeros(batch.shape[0], self.cfg.guidance_channels, *batch.shape[2:])], 1)
        per_call = max(1, self.inferer.max_batch_pixels // math.prod(batch.shape[2:]))
        pooled = []
        for chunk in batch.split(per_call):
            cond = self.net.condition(chunk.to(self.device))
            parts = cond.values() if isinstance(cond, dict) else cond if isinstance(cond, (list, tuple)) else [cond]
            pooled.append(torch.cat([t.float().flatten(2).mean(-1) for t in parts
                                     if isinstance(t, torch.Tensor) and t.ndim >= 3], 1).cpu())
        return torch.cat(pooled).mean(0)

    def _members(self, net: nn.Module, batch: torch.Tensor, n: int, gen: torch.Generator | None,
                 noise: torch.Tensor | None = None) -> tuple:
        """Members of one batch ``[B, C' (+ guidance) (+ K known values + 1 known mask), ...]``: the side
        channels the inferer appended are split off here (see :meth:`side_channels`)."""
        c, g, k = self.cfg.in_channels, self.cfg.guidance_channels, self.cfg.num_classes
        image, rest = batch[:, : c + g], batch[:, c + g :]
        if image.shape[1] < c + g:  # a click-trained network without clicks: zero guidance
            image = torch.cat([image, image.new_zeros(image.shape[0], c + g - image.shape[1], *image.shape[2:])], 1)
        known = (rest[:, :k].to(self.device), rest[:, k : k + 1].to(self.device) > 0.5) if rest.shape[1] else None
        p, anchor = self.sampler.members_and_anchor(net, image.to(self.device), n, gen, known=known, noise=noise)
        return p.float().cpu(), (None if anchor is None else anchor.float().cpu())

    def side_channels(self, shape, clicks: Clicks | None = None,
                      known: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor | None:
        """Per-voxel channels for the inferer on the working grid ``shape``: the click guidance (a
        click-trained network) and, when anything is held, the held values (one-hot in [-1, 1]) and mask.
        ``clicks`` are on the working grid; ``known = (label [1, *shape], mask [1, *shape])`` holds
        voxels of a label the annotator made (partial labels); clicks win where both hold a voxel."""
        slice_model = self.cfg.spatial_dims == 2
        parts = []
        if self.cfg.click_channels:
            parts.append(guidance(clicks or Clicks(), shape, self.cfg.num_classes, slice_model))
        values, mask = click_region(clicks or Clicks(), shape, self.cfg.num_classes, slice_model)
        if known is not None:
            label, held = torch.as_tensor(known[0])[0].long(), torch.as_tensor(known[1])[0].bool() & ~mask[0]
            if int(label.max()) >= self.cfg.num_classes or int(label.min()) < 0:
                raise InputError(f"the known label holds values outside 0..{self.cfg.num_classes - 1}")
            onehot = torch.nn.functional.one_hot(label, self.cfg.num_classes).movedim(-1, 0).float() * 2 - 1
            values = torch.where(held[None], onehot, values)
            mask = mask | held[None]
        if mask.any():
            parts += [values, mask.float()]
        return torch.cat(parts) if parts else None

    def held_mask(self, side: torch.Tensor | None) -> torch.Tensor | None:
        """The held-voxel mask ``[1, *spatial]`` bool of side channels, None when nothing is held."""
        if side is None or side.shape[0] <= self.cfg.guidance_channels:
            return None
        return side[-1:] > 0.5

    def ensemble(self, preprocessed: torch.Tensor, side: torch.Tensor | None = None,
                 previous: EnsembleOutput | None = None) -> EnsembleOutput:
        """Run the ensemble on an already preprocessed image ``[C, *spatial]``, with optional side
        channels (:meth:`side_channels`). With ``previous`` (the plain result of the same image) a slice
        model recomputes only the slices the side channels touch and copies the rest."""
        held = self.held_mask(side)
        if previous is not None and held is None:
            return previous  # nothing held: the plain result (a click always holds its neighbourhood)
        only = None
        if previous is not None and self.cfg.spatial_dims == 2 and preprocessed.ndim == 4:
            only = torch.nonzero(held.flatten(0, 2).amax(0)).flatten().tolist()
        return self.inferer(preprocessed, self.net, side=side, only=only, previous=previous if only is not None else None)

    def __call__(
        self,
        image: ImageFiles | MetaTensor | None,
        clicks: Clicks | None = None,
        known: tuple[torch.Tensor, torch.Tensor] | None = None,
        previous: "Prediction | None" = None,
    ) -> Prediction:
        """Segment an image file (or one file per channel) or a loaded ``[C, *spatial]`` image.

        Interactive use: ``clicks`` (voxel indices of the input image, see :mod:`monai_segdiff.clicks`)
        and ``known = (label [1, *spatial], mask [1, *spatial])`` on the input grid (the annotator's
        label and which of its voxels are final) are held in every member; the answer gives every
        clicked voxel and every known voxel its label. ``previous``: the plain (click-free) prediction of
        the same image, whose preprocessed image and ensemble are reused (``image`` may then be None): a
        slice model reruns only the slices holding clicks or known voxels."""
        t0 = time.perf_counter()
        if previous is not None:
            img = previous.label  # the input grid (shape, affine, meta) of the same image
        else:
            img = image if isinstance(image, torch.Tensor) else load_image(image)
            if not isinstance(img, MetaTensor):
                img = MetaTensor(img)
        t_load = time.perf_counter()
        if previous is not None:
            pre = previous.preprocessed
        else:
            check_image(img, self.cfg)
            pre = apply(self.preprocess[img.ndim - 1], {"image": img.float()})["image"]
        work_clicks = None if not clicks else clicks.to_grid(img.affine, pre.affine, pre.shape[1:])
        work_known = None if known is None else self._to_working_grid(known, img, pre)
        side = self.side_channels(pre.shape[1:], work_clicks, work_known) if (clicks or known is not None) else None
        t_pre = time.perf_counter()
        out = self.ensemble(pre, side, None if previous is None else previous.ensemble)
        t_ens = time.perf_counter()
        umap = unc.uncertainty_map(self.uncertainty_kind, out.probs, out.samples, out.expected_entropy)
        t_unc = time.perf_counter()
        held = self.held_mask(side)
        held_label = None if held is None else torch.where(held[0], side[-1 - self.cfg.num_classes:-1].argmax(0), -1)
        probs = self.postprocess.select(out.probs, self.postprocess.smooth(out.probs), keep=held_label)
        label_pre = unc.fuse(probs, out.samples, method=self.cfg.fusion, num_classes=self.cfg.num_classes)
        label_pre = label_pre.to(torch.uint8)  # class indices < 256 (a CT-sized int64 map is 0.3 GiB)
        label_pre = self.postprocess.clean(label_pre)
        if held_label is not None:
            probs, label_pre = self._keep_fixed(probs, label_pre, held_label, None if pre.ndim != 4 else previous)
        spacing = [float(s) for s in pre.pixdim[: pre.ndim - 1]] if hasattr(pre, "pixdim") else None
        if work_clicks and self.follow:
            label_pre, probs = follow_clicks(label_pre, probs, out.probs, work_clicks, held=held_label >= 0,
                                             image=pre[0].as_tensor() if hasattr(pre, "as_tensor") else pre[0],
                                             plain=None if previous is None else previous.label_work,
                                             spacing=spacing)
        if work_clicks and known is None and previous is not None and previous.fused is not None:
            # beyond the clicks' reach the plain answer stays (resampling a clicked slice, or a 3D model's
            # whole volume, would otherwise redraw voxels no click speaks for)
            near = within_reach(work_clicks, label_pre.shape, spacing=spacing)
            probs = torch.where(near, probs, previous.fused)
            label_pre = torch.where(near, label_pre, previous.label_work)
        t_post = time.perf_counter()
        label, umap_orig = self._to_input_grid(probs, umap, label_pre, pre, img)
        t_back = time.perf_counter()
        if self.postprocess:  # resampling to the input grid can bring back specks or holes
            label = MetaTensor(self.postprocess.clean(label[0], median=False)[None], meta=label.meta)
        label = self._hold_on_input_grid(label, clicks, known)
        t_clean = time.perf_counter()
        stats = {
            "label_names": self.cfg.label_names,
            "labels": unc.label_statistics(
                label_pre, umap, out.samples, {n: v for n, v in self.cfg.label_names.items() if v > 0},
                voxel_volume_mm3=float(math.prod(spacing or [1.0])), threshold=self.threshold,
            ),
            "case_score": unc.case_score(umap, out.probs, out.samples),
            "uncertainty": self.uncertainty_kind,
            "postprocess": list(self.postprocess.ops),
            "samples": self.num_samples,
            "tta_flips": self.tta_flips,
            "steps": getattr(self.sampler, "num_evaluations", 1),
            "network": self.cfg.network,
        }
        if img.ndim == 4:  # a volume: how uncertain each input slice is (partial annotation picks from these)
            axis, per_slice = selection.input_slice_scores(
                umap.numpy(), pre.affine.numpy(), img.affine.numpy(), img.shape[1:])
            stats["slice_scores"] = {"axis": axis, "slices": sorted(per_slice),
                                     "scores": [per_slice[j] for j in sorted(per_slice)]}
        if clicks or known is not None:
            stats["interaction"] = {
                "clicks": len(clicks or []),
                "held_voxels": 0 if held is None else int(held.sum()),
                "recomputed_slices": (int(held.flatten(0, 2).amax(0).sum()) if held is not None and previous
                                      is not None and self.cfg.spatial_dims == 2 and pre.ndim == 4 else None),
            }
        t_end = time.perf_counter()
        # seconds per stage: reading the file, RAS + spacing + intensity, the network ensemble, the
        # uncertainty map, the clean-up (both passes), resampling back to the input grid, statistics
        stats["timings"] = {
            "load_s": t_load - t0, "preprocess_s": t_pre - t_load, "ensemble_s": t_ens - t_pre,
            "uncertainty_s": t_unc - t_ens, "postprocess_s": (t_post - t_unc) + (t_clean - t_back),
            "resample_s": t_back - t_post, "statistics_s": t_end - t_clean, "total_s": t_end - t0,
        }
        return Prediction(label, umap_orig, out, pre, stats, probs, label_pre)

    def _keep_fixed(self, probs: torch.Tensor, label: torch.Tensor, held_label: torch.Tensor,
                    previous: "Prediction | None") -> tuple[torch.Tensor, torch.Tensor]:
        """The clean-up never overrides what the annotator fixed (``held_label``: class or -1), and, for a
        slice model updating ``previous`` (a volume's plain prediction), slices without anything held keep
        the plain answer (the clean-up acts in 3D and would otherwise reach them)."""
        held = held_label >= 0
        onehot = torch.nn.functional.one_hot(held_label.clamp_min(0), self.cfg.num_classes).movedim(-1, 0)
        probs = torch.where(held[None], onehot.to(probs.dtype), probs)
        label = torch.where(held, held_label.to(label.dtype), label)
        if previous is not None and previous.fused is not None and self.cfg.spatial_dims == 2:
            untouched = ~held.flatten(0, 1).any(0)
            probs = torch.where(untouched, previous.fused, probs)
            label = torch.where(untouched, previous.label_work, label)
        return probs, label

    @staticmethod
    def _to_working_grid(known, img: MetaTensor, pre: MetaTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The annotator's label and its final voxels from the input grid to the working grid (nearest)."""
        label, mask = (torch.as_tensor(k) for k in known)
        if label.shape[-(img.ndim - 1):] != img.shape[1:] or mask.shape != label.shape:
            raise InputError(f"the known label has size {list(label.shape[1:])}, the image {list(img.shape[1:])}")
        if pre.shape[1:] == img.shape[1:] and torch.allclose(pre.affine.double(), img.affine.double(), atol=1e-4):
            return label, mask.bool()
        nearest = ResampleToMatch(mode="nearest", padding_mode="zeros")
        both = MetaTensor(torch.cat([label.float(), mask.float()]), affine=img.affine)
        out = nearest(both, img_dst=MetaTensor(torch.zeros(1, *pre.shape[1:]), affine=pre.affine)).as_tensor()
        return out[:1].round().long(), out[1:] > 0.5

    @staticmethod
    def _hold_on_input_grid(label: MetaTensor, clicks: Clicks | None, known) -> MetaTensor:
        """Every known voxel and every clicked voxel of the input grid keeps its label in the answer."""
        if known is not None:
            k_label, k_mask = (torch.as_tensor(k) for k in known)
            label[k_mask.bool()] = k_label[k_mask.bool()].to(label.dtype)
        for value, p in (clicks.points if clicks else []):
            label[(0, *p)] = value
        return label

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
