"""Transforms for diffusion segmentation: loading and resampling (MONAI), intensity normalisation
that works for CT and MRI without per-scan tuning, masks <-> one-hot in [-1, 1], and foreground-aware
2D-slice / 2D-image / 3D-patch sampling from preprocessed volumes.

2D images (PNG/JPG/BMP) are read by MONAI's ``PILReader`` (axes swapped to MONAI's (x, y) order, as
every MONAI reader): RGB gives 3 image channels, grayscale 1 (alpha and palettes are dropped); masks
keep their pixel values (or palette indices). A mask whose values are only 0 and 255 -- the usual way
a binary mask is saved as an 8-bit picture -- is read as 0/1. A multi-channel case given as several
files (one per channel) is stacked into channels by ``LoadImaged``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    Orientationd,
    RandAdjustContrast,
    RandGaussianNoise,
    RandScaleIntensity,
    RandShiftIntensity,
    ResampleToMatch,
    ScaleIntensityRangePercentilesd,
    ScaleIntensityRanged,
    Spacingd,
)

from monai.data import MetaTensor, PILReader
from monai.utils import convert_to_tensor, ensure_tuple_rep

from .config import SegDiffConfig, parse_augment  # noqa: F401  (parse_augment: importable from here too)
from .errors import InputError
from .slicer_io import SegNrrdReader

MAX_VOXELS = 2**27  # values of an input file (e.g. 512 x 512 x 512): larger files are refused unread
MAX_WORKING_VOXELS = 2**26  # voxels x channels after resampling to the model's spacing
UNANNOTATED = 255  # label value of voxels of a partial label that nobody annotated: never a class, never trained on
ANNOTATED_MASK = "annotated_mask"  # the key of the annotated-voxel mask while a partial label is preprocessed


class AnnotatedMaskd(MapTransform):
    """For a partial label (``data[info_key] = {"axis", "slices"}``, see ``data.annotated_slices``): add
    ``data[ANNOTATED_MASK]``, 1 on the recorded slices of the label array and on every slice where the
    label holds foreground, 0 elsewhere, on the label's grid (it is then oriented and resampled with the
    label, nearest neighbour). Without a record nothing is added.

    Args:
        label_key: the label, ``[1, X, Y, Z]`` as loaded (before orientation).
        info_key: the record of annotated slices in the data dict.
    """

    def __init__(self, label_key: str = "label", info_key: str = "annotated") -> None:
        super().__init__([label_key], allow_missing_keys=True)
        self.label_key, self.info_key = label_key, info_key

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        info = d.get(self.info_key)
        if not info or self.label_key not in d:
            return d
        lab = d[self.label_key]
        axis = int(info["axis"])
        if lab.ndim != 4:
            raise InputError(f"annotated slices need a 3D label; {self.label_key} has shape {tuple(lab.shape[1:])}")
        n = lab.shape[1 + axis]
        outside = [i for i in info["slices"] if not 0 <= int(i) < n]
        if outside:
            raise InputError(f"annotated slices {outside[:10]} are outside the label's {n} slices along axis {axis}")
        keep = torch.zeros(n, dtype=torch.bool)
        keep[[int(i) for i in info["slices"]]] = True
        others = [a for a in range(4) if a != 1 + axis]
        keep |= (lab.as_tensor() > 0).amax(dim=others).reshape(n).bool()  # a structure drawn anywhere was annotated
        shape = [1, 1, 1, 1]
        shape[1 + axis] = n
        mask = lab.clone()
        mask[:] = keep.reshape(shape).to(lab.dtype)
        d[ANNOTATED_MASK] = mask
        return d


class UnannotatedAsIgnored(MapTransform):
    """After preprocessing: label voxels outside ``data[ANNOTATED_MASK]`` become ``UNANNOTATED``; the mask
    is removed. Without a mask nothing changes."""

    def __init__(self, label_key: str = "label") -> None:
        super().__init__([label_key], allow_missing_keys=True)
        self.label_key = label_key

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        mask = d.pop(ANNOTATED_MASK, None)
        if mask is not None:
            lab = d[self.label_key].clone()
            lab[mask.as_tensor() < 0.5] = UNANNOTATED
            d[self.label_key] = lab
        return d


class CheckGridd(MapTransform):
    """Refuse an image whose grid after resampling to ``pixdim`` would exceed ``max_voxels`` values
    (e.g. 0.01 mm voxels resampled to 1.5 mm, or 100 mm voxels to 0.5 mm), before ``Spacingd`` allocates it.

    Args:
        keys: image keys (MetaTensors ``[C, *spatial]`` in RAS).
        pixdim: the target spacing given to ``Spacingd`` (<= 0 keeps an axis).
        max_voxels: bound on channels x voxels of the resampled grid.
    """

    def __init__(self, keys: Sequence[str], pixdim: Sequence[float], max_voxels: int = MAX_WORKING_VOXELS) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.pixdim, self.max_voxels = list(pixdim), int(max_voxels)

    def __call__(self, data: dict) -> dict:
        for key in self.key_iterator(data):
            img = data[key]
            spacing = [float(s) for s in getattr(img, "pixdim", [1.0] * (img.ndim - 1))]
            size = float(img.shape[0])
            for n, have, want in zip(img.shape[1:], spacing, self.pixdim + [-1.0] * img.ndim):
                size *= n * have / want if want > 0 and have > 0 else n
            if size > self.max_voxels:
                raise InputError(
                    f"{key} {tuple(img.shape[1:])} at spacing {[round(s, 4) for s in spacing]} mm would be "
                    f"{size:,.0f} voxels resampled to the model's {self.pixdim} mm (limit {self.max_voxels:,}): "
                    f"check the image's spacing, or crop it"
                )
        return data


class CheckFinited(MapTransform):
    """Replace NaN / Inf voxels by the finite minimum so they cannot poison normalisation."""

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            finite = torch.isfinite(img)
            if not bool(finite.all()):
                if not bool(finite.any()):
                    raise InputError(f"{key} has no finite voxel")
                img = img.clone()
                img[~finite] = img[finite].min()
                d[key] = img
        return d


class CheckLabelsd(MapTransform):
    """Reject labels with values outside ``0..num_classes-1`` or a grid other than the image's.

    A label holding only the values 0 and 255 (a binary mask saved as an 8-bit picture) becomes 0/1.
    """

    def __init__(self, keys: Sequence[str], num_classes: int, image_key: str = "image") -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.num_classes, self.image_key = num_classes, image_key

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            lab = d[key]
            if self.image_key in d and tuple(lab.shape[1:]) != tuple(d[self.image_key].shape[1:]):
                raise InputError(
                    f"{key} shape {tuple(lab.shape[1:])} does not match image shape {tuple(d[self.image_key].shape[1:])}"
                )
            if self.image_key in d and not _same_affine(lab, d[self.image_key]):
                raise InputError(f"{key} geometry (origin / spacing / direction) does not match the image's")
            lab = binary_255_as_01(lab.round()) if self.num_classes <= 255 else lab.round()
            values = torch.unique(lab)
            bad = [int(v) for v in values if v < 0 or v >= self.num_classes]
            if bad:
                raise InputError(f"{key} has values {bad} outside the label set 0..{self.num_classes - 1}")
            d[key] = lab
        return d


def same_grid(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, tolerance: float = 0.01) -> bool:
    """True if two voxel-to-world affines agree within ``tolerance`` of the smallest voxel size."""
    a = np.asarray(torch.as_tensor(a).detach().cpu(), dtype=np.float64)
    b = np.asarray(torch.as_tensor(b).detach().cpu(), dtype=np.float64)
    if a.shape != b.shape:
        return False
    voxel = float(np.linalg.norm(a[:-1, :-1], axis=0).min()) or 1.0
    return float(np.abs(a - b).max()) <= tolerance * voxel


def _same_affine(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Two MetaTensors on the same grid (:func:`same_grid`); True without comparable affines."""
    if not (hasattr(a, "affine") and hasattr(b, "affine")) or a.affine.shape != b.affine.shape:
        return True
    return same_grid(a.affine, b.affine)


def binary_255_as_01(label: torch.Tensor) -> torch.Tensor:
    """A mask holding only the values 0 and 255 (a binary mask saved as an 8-bit picture) -> 0/1;
    any other mask unchanged."""
    values = torch.unique(label)
    if values.numel() and int(values.max()) == 255 and set(values.tolist()) <= {0.0, 255.0}:
        return label / 255
    return label


def intensity_transform(cfg: SegDiffConfig, keys: Sequence[str] = ("image",)) -> MapTransform:
    """Map intensities to [-1, 1]: robust percentiles per channel, or a fixed CT window."""
    if cfg.intensity == "ct":
        lo, hi = cfg.ct_window
        return ScaleIntensityRanged(keys, a_min=lo, a_max=hi, b_min=-1.0, b_max=1.0, clip=True)
    lo, hi = cfg.percentiles
    return ScaleIntensityRangePercentilesd(
        keys, lower=lo, upper=hi, b_min=-1.0, b_max=1.0, clip=True, channel_wise=True
    )


def picture_as_image(img):
    """PIL converter for images: RGB or grayscale (alpha, palettes, CMYK ... converted)."""
    if img.mode in ("RGB", "L", "I", "I;16", "F"):
        return img
    return img.convert("L" if img.mode in ("1", "LA", "La") else "RGB")


def picture_as_label(img):
    """PIL converter for masks: one value per pixel (palette indices kept; RGB/alpha -> gray)."""
    if img.mode in ("L", "P", "I", "I;16", "F"):
        return img
    return img.convert("L")


def load_transforms(keys: Sequence[str], image_key: str = "image", label_names: Mapping[str, int] | None = None) -> list:
    """Files -> float MetaTensors ``[C, *spatial]``; pictures through ``PILReader`` (see the module doc);
    Slicer ``.seg.nrrd`` labels through ``slicerio``, segments mapped to ``label_names`` by name."""
    label_keys = [k for k in keys if k != image_key]
    steps = [LoadImaged([image_key], PILReader(picture_as_image), image_only=True, allow_missing_keys=True)]
    if label_keys:
        readers = [PILReader(picture_as_label), SegNrrdReader(label_names)]  # the last is tried first
        steps += [LoadImaged(label_keys, readers, image_only=True, allow_missing_keys=True)]
    return steps + [
        EnsureChannelFirstd(keys, allow_missing_keys=True),
        EnsureTyped(keys, dtype=torch.float32, allow_missing_keys=True, track_meta=True),
    ]


def spatial_transforms(
    cfg: SegDiffConfig, image_key: str = "image", label_keys: Sequence[str] = (), image_dims: int | None = None
) -> list:
    """RAS orientation and resampling to ``cfg.spacing`` (<= 0 keeps the image's own spacing), on the
    first ``image_dims`` axes (default ``cfg.image_dims``: 2 for 2D images, 3 for volumes)."""
    keys = [image_key, *label_keys]
    modes = ["bilinear"] + ["nearest"] * len(label_keys)
    dims = cfg.image_dims if image_dims is None else image_dims
    return [
        Orientationd(keys, axcodes="RAS"[:dims], allow_missing_keys=True),
        SlabSpacingd(keys, pixdim=cfg.spacing[:dims], mode=modes),
    ]


def preprocess_transforms(
    cfg: SegDiffConfig, label_keys: Sequence[str] = (), load: bool = True, image_dims: int | None = None,
    partial: bool = False,
) -> Compose:
    """Image (and labels) file -> RAS, resampled, normalised MetaTensors ``[C, *spatial]``.

    ``image_dims`` (default ``cfg.image_dims``) is the dimensionality of the input: 2D images are
    oriented and resampled in-plane only and kept 2D (no slicing); volumes in 3D.

    ``partial``: the first label key may be a partial label whose record of annotated slices is the data
    dict's ``annotated``; its unannotated voxels come out as ``UNANNOTATED`` (:class:`AnnotatedMaskd`).
    """
    keys = ["image", *label_keys]
    steps = load_transforms(keys, label_names=cfg.label_names) if load else []
    steps += [CheckFinited(["image"])]
    if partial and label_keys:
        steps += [AnnotatedMaskd(label_keys[0])]
    spatial = spatial_transforms(cfg, "image", [*label_keys, *([ANNOTATED_MASK] if partial else [])], image_dims)
    steps += spatial[:1] + [CheckGridd(["image"], cfg.spacing)] + spatial[1:]  # bound before Spacingd
    steps += [CheckLabelsd(label_keys, cfg.num_classes)] if label_keys else []
    steps += [UnannotatedAsIgnored(label_keys[0])] if partial and label_keys else []
    steps += [intensity_transform(cfg)]
    return Compose(steps)


# -- masks <-> one-hot in [-1, 1] -----------------------------------------------------------------
def to_onehot_scaled(label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class indices ``[B, 1, ...]`` -> one-hot ``[B, K, ...]`` scaled to {-1, 1}."""
    onehot = F.one_hot(label[:, 0].long(), num_classes).movedim(-1, 1)
    return onehot.float() * 2 - 1


def from_onehot_scaled(x: torch.Tensor) -> torch.Tensor:
    """``[B, K, ...]`` in [-1, 1] -> class indices ``[B, 1, ...]`` (argmax)."""
    return x.argmax(1, keepdim=True)


def destination_slabs(spatial: Sequence[int], affine: torch.Tensor, max_voxels: int = 2**22):
    """Yield ``(slice, empty slab with its affine)`` along the last axis of a 3D grid (``spatial``
    shape, voxel-to-world ``affine``), so that resampling to a CT-sized grid holds one slab's
    sampling grid at a time (MONAI's ``Resample`` builds a float grid of 3 coordinates per output
    voxel: 0.9 GiB for 512x512x300 and each of the probability channels, which took the infer's
    peak memory to 8 GiB). 2D grids: one slab."""
    spatial = tuple(int(s) for s in spatial)
    affine = torch.as_tensor(affine).double()
    if len(spatial) < 3:
        yield slice(None), MetaTensor(torch.empty(1, *spatial), affine=affine)
        return
    depth = spatial[-1]
    step = max(1, max_voxels // max(1, math.prod(spatial[:-1])))
    for z0 in range(0, depth, step):
        z1 = min(depth, z0 + step)
        slab_affine = affine.clone()
        slab_affine[:3, 3] = affine[:3, 3] + affine[:3, 2] * z0  # voxel (i, j, k) -> (i, j, k + z0)
        yield slice(z0, z1), MetaTensor(torch.empty(1, *spatial[:-1], z1 - z0), affine=slab_affine)


class SlabSpacingd(MapTransform):
    """MONAI ``Spacingd`` computed one slab of output slices at a time when the output is large.

    ``Spacingd`` resamples through a sampling grid of the whole output (``affine_grid`` +
    ``grid_sample``), about 60 bytes per output voxel: preprocessing a 512x512x150 CT at 0.7 mm to 1 mm
    raised the peak memory by 1.15 GiB (0.4 GiB slab-wise). Here the output grid (shape, affine) is MONAI's own lazy ``Spacing`` plan and each
    slab is filled by MONAI's ``ResampleToMatch``, so the values equal ``Spacingd``'s; outputs up to
    ``max_voxels`` voxels go through ``Spacingd`` itself.

    Args:
        keys: image/label keys; pixdim, mode: as ``Spacingd`` (pixdim <= 0 keeps an axis).
        max_voxels: output voxels per slab.
    """

    def __init__(self, keys: Sequence[str], pixdim: Sequence[float], mode: str | Sequence[str],
                 max_voxels: int = 2**21) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.spacingd = Spacingd(keys, pixdim=pixdim, mode=mode, allow_missing_keys=True)
        self.modes = dict(zip(keys, ensure_tuple_rep(mode, len(keys))))
        self.max_voxels = int(max_voxels)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        plans = {}
        for key in self.key_iterator(d):
            plan = self.spacingd.spacing_transform(d[key], mode=self.modes[key], lazy=True)
            plans[key] = tuple(plan.peek_pending_shape()), plan.peek_pending_affine()
        if all(len(shape) < 3 or math.prod(shape) <= self.max_voxels for shape, _ in plans.values()):
            return self.spacingd(d)
        for key, (shape, affine) in plans.items():
            img, mode = d[key], self.modes[key]
            resample = ResampleToMatch(mode=mode, padding_mode="border")
            out = torch.empty(img.shape[0], *shape, dtype=img.dtype)
            for z, slab in destination_slabs(shape, affine, self.max_voxels):
                out[..., z] = resample(img, img_dst=slab).as_tensor()
            d[key] = MetaTensor(out, affine=affine.to(torch.float64), meta={k: v for k, v in img.meta.items()
                                                                            if k != "affine"})
        return d


# -- training samples from preprocessed volumes ---------------------------------------------------
def _intensity_augmentation() -> Compose:
    """Contrast (gamma), scale and shift of the normalised [-1, 1] intensities, as nnU-Net does, so a
    model trained on one scanner's range copes with another's."""
    return Compose([
        RandAdjustContrast(prob=0.3, gamma=(0.7, 1.5)),
        RandScaleIntensity(factors=0.25, prob=0.3),
        RandShiftIntensity(offsets=0.1, prob=0.3),
    ])


#: name (``config.AUGMENT_OPTIONS``) -> builder of a MONAI image transform (``flip`` is handled by the
#: sampler: image and label)
AUGMENTATIONS = {
    "flip": None,
    "intensity": _intensity_augmentation,
    "noise": lambda: RandGaussianNoise(prob=0.15, std=0.05),
}


def _pad_to(x: torch.Tensor, size: Sequence[int], value: float) -> torch.Tensor:
    pads = []
    for s, r in zip(reversed(x.shape[-len(size) :]), reversed(size)):
        total = max(0, r - s)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value) if any(pads) else x


class PatchSampler:
    """Random training samples from preprocessed volumes held in memory.

    2D: a slice (with ``context`` neighbours as channels) cropped to ``roi_size`` in-plane, or a crop
    of a 2D image (``[C, X, Y]``, no slicing); 3D: a patch of ``roi_size``. A share ``foreground_fraction`` of samples is centred on a voxel of a
    foreground class drawn uniformly among the classes present in the case (as MONAI's
    ``RandCropByLabelClassesd``), so a small class such as a lesion is seen as often as a large
    organ; the rest anywhere. A partial label (``UNANNOTATED`` outside its annotated slices) gives only
    its annotated slices, so nothing unannotated reaches a loss. Each sample is then augmented as ``cfg.augment`` says (random flips of
    image and label along each spatial axis, intensity contrast/scale/shift, Gaussian noise); all
    randomness comes from the sampler's one generator, so ``--resume`` replays it exactly.

    Args:
        volumes: ``[(image [C, X, Y, Z], labels [R, X, Y, Z])]`` (2D images: ``[C, X, Y]``,
            ``[R, X, Y]``); R label maps per case (final and raters), one drawn at random per sample.
        cfg: sizes, context and foreground share.
        seed: seed of the sampler's own generator.
    """

    def __init__(self, volumes: Sequence[tuple[torch.Tensor, torch.Tensor]], cfg: SegDiffConfig, seed: int = 0):
        if not volumes:
            raise InputError("no labelled volume to train on")
        self.volumes, self.cfg = volumes, cfg
        self.rng = np.random.default_rng(seed)
        self.flip = "flip" in cfg.augment
        image_aug = [AUGMENTATIONS[name]() for name in cfg.augment if name != "flip"]
        self.image_aug = Compose(image_aug) if image_aug else None
        # partial labels: the slices annotated whole, per case (None: the whole case is annotated)
        self.slices = [self._annotated_slices(img, lab) for img, lab in volumes]
        self.cases = [i for i, z in enumerate(self.slices) if z is None or len(z)]
        if not self.cases:
            raise InputError("no annotated slice to train on: every partial label's annotated slices were lost "
                             "in resampling, or lie across another axis than the model's slices")
        # per case, per present foreground class: voxel indices of that class in any label map (annotated slices)
        self.fg = []
        for (_, lab), z in zip(volumes, self.slices):
            found = [torch.nonzero((lab == c).any(0)).numpy() for c in range(1, cfg.num_classes)]
            if z is not None:
                found = [idx[np.isin(idx[:, -1], z)] for idx in found]
            self.fg.append([idx for idx in found if len(idx)])

    def _annotated_slices(self, img: torch.Tensor, lab: torch.Tensor) -> np.ndarray | None:
        """Indices of the slices without an ``UNANNOTATED`` voxel, or None when the label has none. Only a
        slice model of volumes can learn from a partial label here (whole annotated slices; a 3D patch
        would need a masked loss, which is not built)."""
        unannotated = lab == UNANNOTATED
        if not bool(unannotated.any()):
            return None
        if self.cfg.spatial_dims != 2 or img.ndim != 4:
            raise InputError("a partial label (annotated slices only) trains a slice model (spatial_dims 2) of "
                             "volumes; this model is 3D or the images are 2D: annotate the whole case")
        return torch.nonzero(~unannotated.flatten(0, -2).any(0)).flatten().numpy()

    def num_slices(self) -> int:
        """Training slices on offer: annotated slices of volumes, one per 2D image."""
        return sum(len(z) if z is not None else (img.shape[-1] if img.ndim == 4 else 1)
                   for (img, _), z in zip(self.volumes, self.slices))

    def _centre(self, i: int) -> np.ndarray:
        shape = np.array(self.volumes[i][0].shape[1:])
        if self.fg[i] and self.rng.random() < self.cfg.foreground_fraction:
            idx = self.fg[i][self.rng.integers(len(self.fg[i]))]
            return idx[self.rng.integers(len(idx))]
        centre = (self.rng.random(len(shape)) * shape).astype(int)
        if self.slices[i] is not None:  # a partial label: an annotated slice
            centre[-1] = self.slices[i][self.rng.integers(len(self.slices[i]))]
        return centre

    def sample(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image [B, C', *roi], label [B, 1, *roi])``."""
        images, labels = [], []
        if self.image_aug is not None:
            # MONAI's random transforms draw from their own RandomState: seed it from our generator
            self.image_aug.set_random_state(seed=int(self.rng.integers(2**31)))
        for _ in range(batch_size):
            i = self.cases[int(self.rng.integers(len(self.cases)))]
            img, lab = self.volumes[i]
            lab = lab[int(self.rng.integers(lab.shape[0]))][None]
            centre = self._centre(i)
            if self.cfg.spatial_dims == 2 and img.ndim == 4:  # a volume: one slice; a 2D image is used whole
                img, lab = self._slice(img, lab, int(centre[2]))
                centre = centre[:2]
            img, lab = self._augment(*self._crop(img, lab, centre))
            images.append(img)
            labels.append(lab)
        return torch.stack(images), torch.stack(labels)

    def _augment(self, img: torch.Tensor, lab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.flip:
            axes = [a for a in range(img.ndim - 1) if self.rng.random() < 0.5]
            if axes:
                img, lab = img.flip([a + 1 for a in axes]), lab.flip([a + 1 for a in axes])
        if self.image_aug is not None:
            img = convert_to_tensor(self.image_aug(img), track_meta=False)
        return img.contiguous(), lab.contiguous()

    def _slice(self, img: torch.Tensor, lab: torch.Tensor, z: int) -> tuple[torch.Tensor, torch.Tensor]:
        d = img.shape[-1]
        idx = [min(max(z + o, 0), d - 1) for o in range(-self.cfg.context, self.cfg.context + 1)]
        return img[..., idx].movedim(-1, 1).reshape(-1, *img.shape[1:3]), lab[..., z]

    def _crop(self, img: torch.Tensor, lab: torch.Tensor, centre: np.ndarray):
        roi = self.cfg.roi_size
        img, lab = _pad_to(img, roi, -1.0), _pad_to(lab, roi, 0.0)
        slices = []
        for c, r, s in zip(centre, roi, img.shape[1:]):
            start = int(min(max(c - r // 2 + self.rng.integers(-r // 4, r // 4 + 1), 0), s - r))
            slices.append(slice(start, start + r))
        return img[(slice(None), *slices)], lab[(slice(None), *slices)]


def apply(transform, data: dict) -> dict:
    """Run a MONAI transform chain, surfacing our ``InputError`` instead of MONAI's wrapper."""
    try:
        return transform(data)
    except RuntimeError as e:
        cause = e
        while cause is not None and not isinstance(cause, InputError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise
