"""Annotator clicks: what 3D Slicer sends, where the clicks land on the working grid, what they hold
fixed, the guidance channels a click-trained network sees, and the simulated annotator of the
interaction benchmark and of click training.

A click is ``(label value, voxel index)``. The 3D Slicer plugin (``plugins/slicer/MONAILabel``, model type
``deepedit``) sends voxel indices ``[i, j, k]`` of the image as loaded (ITK order, as MONAI's readers
give them) either as ``foreground`` / ``background`` lists with the current segment's name in ``label``
(single-label mode), or as one list per label name (multi-label mode, the plugin's choice whenever the
model lists labels; clicks on a segment named ``background`` are background clicks).

The neighbourhood a click fixes (``CLICK_RADIUS``): the voxels of the working grid within 2 voxels of
the click, in the clicked slice for a slice (2D / 2.5D) model, in a ball for a 3D model. Those voxels
get the clicked label in every ensemble member, and the clicked voxel gets it in the answer on the
input grid.

MONAI's ``monai.apps.deepedit`` transforms do the same for dictionaries of whole volumes keyed by label
name inside an ignite loop; here clicks act on batches of slices inside the project's own loop and
sampler, so the few lines that render and simulate them are written here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

from .errors import InputError
from .values import affine_4x4

CLICK_RADIUS = 2  # voxels of the working grid (see the module docstring)
GUIDANCE_SIGMA = 2.0  # voxels: width of the Gaussian spot a click makes in a guidance channel
SLICER_NAMES = ("foreground", "background", "label", "slice", "roi", "reset_state")


@dataclass
class Clicks:
    """Clicks ``[(label value, voxel index)]`` on one grid (the input image's, or the working grid)."""

    points: list[tuple[int, tuple[int, ...]]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.points)

    def __len__(self) -> int:
        return len(self.points)

    def add(self, value: int, index: Sequence[int]) -> "Clicks":
        return Clicks(self.points + [(int(value), tuple(int(i) for i in index))])

    def check_within(self, shape: Sequence[int]) -> "Clicks":
        """The clicks as indices of an image of spatial ``shape``; a third index 0 on a 2D image is
        dropped (3D Slicer shows a 2D image as a one-slice volume). ``InputError`` for a click outside."""
        out = []
        for value, p in self.points:
            q = p[: len(shape)] if len(p) > len(shape) and not any(p[len(shape):]) else p
            if len(q) != len(shape) or any(c < 0 or c >= s for c, s in zip(q, shape)):
                raise InputError(f"click {list(p)} lies outside the image of size {list(shape)}")
            out.append((value, q))
        return Clicks(out)

    def to_grid(self, src_affine, dst_affine, dst_shape: Sequence[int]) -> "Clicks":
        """The same clicks as voxel indices of another grid (world coordinates through both affines),
        rounded and clipped into ``dst_shape`` (a click on the border of the field of view stays on it)."""
        if not self.points:
            return Clicks()
        src, dst = affine_4x4(src_affine), affine_4x4(dst_affine)
        dims = len(self.points[0][1])
        pts = np.zeros((len(self.points), 4))
        pts[:, :dims] = [p for _, p in self.points]
        pts[:, 3] = 1.0
        idx = (np.linalg.inv(dst) @ src @ pts.T).T[:, : len(dst_shape)]
        idx = np.clip(np.rint(idx), 0, np.asarray(dst_shape) - 1).astype(int)
        return Clicks([(v, tuple(i.tolist())) for (v, _), i in zip(self.points, idx)])


def _points(value, key: str) -> list[tuple[int, ...]]:
    if value is None or value == "":
        return []
    if not isinstance(value, (list, tuple)):
        raise InputError(f"{key!r} must be a list of voxel indices [[i, j, k], ...], got {value!r}")
    out = []
    for p in value:
        if not isinstance(p, (list, tuple)) or len(p) not in (2, 3) or not all(
            isinstance(c, (int, float)) and not isinstance(c, bool) and c == c for c in p
        ):
            raise InputError(f"{key!r}: each click must be 2 or 3 voxel indices, got {p!r}")
        out.append(tuple(int(round(c)) for c in p))
    return out


def parse_clicks(params: Mapping, label_names: Mapping[str, int], shape: Sequence[int] | None = None) -> Clicks:
    """The clicks of an infer request from the 3D Slicer plugin, checked against the model's labels
    ``{name: value}`` (background 0) and, if given, the image's spatial ``shape`` (:meth:`Clicks.check_within`).

    Single-label mode: ``foreground`` clicks get the value of ``label``, ``background`` clicks 0. Multi-label
    mode: every key that names a label (any case) holds that label's clicks. ``InputError`` for clicks of
    a label the model does not segment, malformed points or points outside the image."""
    lower = {str(k).lower(): int(v) for k, v in label_names.items()}
    clicks = Clicks()
    fg = _points(params.get("foreground"), "foreground")
    if fg:
        name = str(params.get("label") or "")
        if name.lower() not in lower or lower[name.lower()] == 0:
            known = ", ".join(n for n, v in label_names.items() if v)
            raise InputError(f"foreground clicks for label {name!r}, which this model does not segment "
                             f"(it segments {known}): submit labels and train (segdiff_train) first")
        clicks.points += [(lower[name.lower()], p) for p in fg]
    clicks.points += [(0, p) for p in _points(params.get("background"), "background")]
    for key, value in params.items():
        k = str(key).lower()
        if k in SLICER_NAMES or k not in lower:
            continue
        clicks.points += [(lower[k], p) for p in _points(value, str(key))]
    return clicks if shape is None else clicks.check_within(shape)


def _box(p: Sequence[int], shape: Sequence[int], reach: int | Sequence[int],
         slice_model: bool) -> tuple[tuple[slice, ...], np.ndarray]:
    """The box of voxels within ``reach`` of click ``p`` (one reach for every axis, or one per axis; only its
    slice for a slice model on a volume) and their squared distances to it in voxels: clicks touch a few
    voxels, never the whole volume (a CT has 10^8)."""
    in_plane = slice_model and len(shape) == 3
    reaches = [int(reach)] * len(shape) if isinstance(reach, (int, np.integer)) else [int(r) for r in reach]
    box = tuple(
        slice(c, c + 1) if (in_plane and axis == 2) else slice(max(0, c - r), min(s, c + r + 1))
        for axis, (c, s, r) in enumerate(zip(p, shape, reaches))
    )
    grids = np.ogrid[box]
    d2 = sum((g - c) ** 2 for axis, (g, c) in enumerate(zip(grids, p)) if not (in_plane and axis == 2))
    return box, np.broadcast_to(d2, tuple(b.stop - b.start for b in box))


def reach_per_axis(reach: int, spacing: Sequence[float] | None) -> tuple[int, ...] | int:
    """``reach`` voxels of the grid's coarsest axis as voxels of each axis (the same distance in mm along
    every axis, rounded down) with ``PHYSICAL`` and ``spacing``: on a 3 x 3 x 2 mm grid a reach of 10 is 30
    mm, 10 / 10 / 15 voxels. Else ``reach`` itself, for every axis (the shipped setting)."""
    if spacing is None or not PHYSICAL:
        return int(reach)
    coarsest = max(float(s) for s in spacing)
    return tuple(int(np.floor(reach * coarsest / float(s) + 1e-6)) for s in spacing)


def click_region(clicks: Clicks, shape: Sequence[int], num_classes: int, slice_model: bool,
                 radius: int = CLICK_RADIUS) -> tuple[torch.Tensor, torch.Tensor]:
    """What the clicks fix on a grid of ``shape``: ``(values [K, *shape] one-hot in [-1, 1], mask [1, *shape]
    bool)``. Each click fixes the voxels within ``radius`` of it, in its slice (last axis) for a slice
    model, else in a ball; where two clicks overlap, the later one wins."""
    values = -torch.ones(num_classes, *shape)
    values[0] = 1.0
    mask = torch.zeros(1, *shape, dtype=torch.bool)
    for value, p in clicks.points:
        if not 0 <= value < num_classes:
            raise InputError(f"click label value {value} is outside the model's {num_classes} classes")
        box, d2 = _box(p, shape, radius, slice_model)
        ball = torch.from_numpy(d2 <= radius**2)
        mask[(0, *box)] |= ball
        region = values[(slice(None), *box)]
        region[:, ball] = -1.0
        region[value, ball] = 1.0
    return values, mask


def guidance(clicks: Clicks, shape: Sequence[int], num_classes: int, slice_model: bool,
             sigma: float = GUIDANCE_SIGMA) -> torch.Tensor:
    """Guidance channels ``[K, *shape]`` in [0, 1]: per label, the maximum of Gaussian spots of width
    ``sigma`` at its clicks (in the clicked slice for a slice model; cut at 4 sigma), as DeepEdit's click
    channels (Diaz-Pinto et al., "DeepEdit: Deep Editable Learning for Interactive Segmentation of 3D
    Medical Images", 2022)."""
    out = torch.zeros(num_classes, *shape)
    for value, p in clicks.points:
        box, d2 = _box(p, shape, int(np.ceil(4 * sigma)), slice_model)
        spot = torch.from_numpy(np.exp(-d2 / (2 * sigma**2)).astype(np.float32))
        out[(value, *box)] = torch.maximum(out[(value, *box)], spot)
    return out


def next_click(prediction: torch.Tensor, reference: torch.Tensor) -> tuple[int, tuple[int, ...]] | None:
    """The simulated annotator's next click: the voxel deepest inside the largest connected error region
    (farthest from its border), labelled as the reference says (the protocol of the interactive
    segmentation literature, e.g. Sofiiuk et al., "Reviving Iterative Training with Mask Guidance for
    Interactive Segmentation", 2022). ``None`` when the prediction has no error."""
    pred, ref = np.asarray(prediction), np.asarray(reference)
    error = pred != ref
    if not error.any():
        return None
    index, _ = centre_of_largest(error)
    return int(ref[index]), index


def centre_of_largest(mask: np.ndarray) -> tuple[tuple[int, ...], np.ndarray]:
    """The voxel of ``mask``'s largest connected component farthest from its border, and that component
    (bool, ``mask``'s shape); ``mask`` must hold a voxel."""
    regions, n = ndimage.label(mask)
    sizes = ndimage.sum_labels(mask, regions, index=np.arange(1, n + 1))
    largest = regions == (int(np.argmax(sizes)) + 1)
    depth = ndimage.distance_transform_edt(np.pad(largest, 1))[tuple(slice(1, -1) for _ in largest.shape)]
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(depth)), depth.shape)), largest


REGION_FLOOR = 0.1  # a member share below which the ensemble counts as sure (as the clean-up's candidate floor)
REGION_REACH = 10  # voxels: how far from its click an ensemble region may be flipped
GROW_MULTIPLIER = 2.5  # standard deviations of the click's neighbourhood a grown region's intensities keep to
# a background click on a structure also takes its part that looks like the click (read per call): on, with
# the SPLIT_MAX_SHARE guard, as measured against a rule written before the run (BENCHMARKS.md, session 18:
# Dice after 10 clicks +0.001 on the phantoms, +0.018 on the real spine CT, unchanged on the three held-out
# real tasks; unguarded, session 17, it cost the phantoms 0.021 and was off)
SPLIT_ATTACHED = True
SPLIT_REACH = REGION_REACH  # voxels: how far from its click that part may reach (read per call)
# the most of the structure within reach the split may take (read per call): where the clicked tissue's
# intensities cover more, the image does not tell it from the structure (a one-voxel rim of partial volume
# on a noisy organ: the unguarded split took 2173 true organ voxels with 29 false ones, session 18)
SPLIT_MAX_SHARE = 0.5
# a click decides only the voxels nearer to it than to every click of another label (read per call): on, as
# measured against a rule written before the run (BENCHMARKS.md, session 19: Dice after 10 clicks +0.085 on
# the phantoms, +0.032 on a held-out real brain tumour, unchanged on the other real tasks)
NEAREST = True
# distances in mm (read per call): a click's reach is the same distance along every axis (REGION_REACH voxels
# of the grid's coarsest axis, see reach_per_axis) and the nearer click is nearer in mm. Off, as measured
# against a rule written before the run (BENCHMARKS.md, session 21: Dice after 10 clicks +0.095 on the real
# spine CT, whose 3 x 3 x 2 mm working grid it reaches 15 slices along; but -0.032 on the phantoms and -0.086
# on the held-out real brain tumour, whose in-plane reach it multiplies by 2 and 8): both are counted in voxels.
PHYSICAL = False


def grow(image: np.ndarray, seed: Sequence[int], multiplier: float = GROW_MULTIPLIER) -> np.ndarray:
    """The region connected to ``seed`` whose intensities lie within ``multiplier`` standard deviations of
    the seed neighbourhood's mean, re-estimated twice (SimpleITK's ``ConfidenceConnected``), as a bool
    array of ``image``'s shape (2D or 3D)."""
    itk = sitk.GetImageFromArray(np.ascontiguousarray(image, dtype=np.float32))
    index = [int(i) for i in reversed(seed)]  # SimpleITK indexes (x, y, z) = numpy's axes reversed
    out = sitk.ConfidenceConnected(itk, seedList=[index], numberOfIterations=2, multiplier=float(multiplier),
                                   initialNeighborhoodRadius=1, replaceValue=1)
    return sitk.GetArrayFromImage(out).astype(bool)


def follow_clicks(label: torch.Tensor, probs: torch.Tensor, gate: torch.Tensor, clicks: Clicks,
                  held: torch.Tensor | None = None, floor: float = REGION_FLOOR,
                  reach: int = REGION_REACH, image: torch.Tensor | None = None,
                  plain: torch.Tensor | None = None, split_attached: bool | None = None,
                  split_reach: int | None = None,
                  spacing: Sequence[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Carry each click to the region around it that the ensemble left open (working grid, 3D).

    ``label [*spatial]``, ``probs [K, *spatial]`` (the answer's class probabilities), ``gate [K, *spatial]``
    (the ensemble's fused probabilities before any clean-up) and ``held [*spatial]`` (the voxels the clicks
    hold). A click of class c takes the connected region (face-connected, within ``reach`` voxels of the
    click) of voxels answered otherwise where the members gave c at least ``floor``, reached from the
    click through such voxels or through the voxels the clicks hold; those voxels become c. A background click on a false
    positive thus removes the part of it the ensemble doubted, a foreground click adds the part of a missed
    structure some members drew; voxels every member agreed on are never flipped: the click selects among
    the hypotheses the ensemble drew, it does not invent one. Only where no member drew anything beyond the
    held voxels and ``image [*spatial]`` (one image channel) is given does the click grow a region of
    similar intensity (:func:`grow`, in 3D within ``reach``, for slice models too: measured better than in
    the clicked slice only, BENCHMARKS.md) over the voxels answered otherwise: the ensemble gave no
    hypothesis there, so the image's is taken. With ``plain [*spatial]`` (the click-free answer) a click on
    a blob of another class that lies wholly within ``reach`` (a connected component of the plain answer
    not touching the reach box, except at the image's border) flips the whole blob: a background click
    inside a small false positive removes it in every slice, a click inside a small hole fills it. With
    ``split_attached`` (default ``SPLIT_ATTACHED``), ``plain`` and ``image``, a background click on a voxel
    the plain answer gave a structure also removes the part of that structure within ``split_reach``
    (default ``SPLIT_REACH``) of the click, connected to it, whose intensities are like the click's
    (:func:`grow` from the click, intersected with the structure): a false positive attached to a true
    structure (too wide a rim, a leak into a neighbour) is split off along the image's own edges, while
    the part that looks different from the clicked tissue stays; when that part would be more than
    ``SPLIT_MAX_SHARE`` of the structure within reach, nothing is split. Voxels held by other clicks are never
    flipped. With ``NEAREST``, a click's rules set only the voxels nearer to it than to every click of
    another label: a background click next to a region a foreground click grew takes back only the part
    nearer to it, and the other way round, in whatever order they were placed. With ``spacing`` (the grid's
    voxel size in mm) and ``PHYSICAL``, reaches and distances are in mm (:func:`reach_per_axis`). Written
    here: no MONAI or scipy routine picks components by a seed voxel under a probability gate."""
    label, probs = label.clone(), probs.clone()
    held = torch.zeros(label.shape, dtype=torch.bool) if held is None else held
    split = SPLIT_ATTACHED if split_attached is None else bool(split_attached)
    split_reach = reach_per_axis(SPLIT_REACH if split_reach is None else int(split_reach), spacing)
    reach = reach_per_axis(reach, spacing)
    for value, p in clicks.points:
        box, _ = _box(p, label.shape, reach, slice_model=False)
        local = tuple(c - b.start for c, b in zip(p, box))
        lab = label[box]
        mine = _nearer(box, p, value, clicks, spacing) if NEAREST else torch.ones(lab.shape, dtype=torch.bool)
        open_ = (gate[(value, *box)] >= floor) & (lab != value)
        open_ |= held[box] & (lab == value)  # paths run through the held neighbourhoods (already the clicked class)
        open_[local] = True  # the clicked voxel itself, whatever the members drew
        regions, _ = ndimage.label(open_.numpy())
        if regions[local] == 0:
            continue
        region = torch.from_numpy(regions == regions[local])
        if plain is not None and int(plain[p]) != value:
            region |= _blob(plain, p, box, local) & ~(held[box] & (lab != value))  # voxels other clicks hold stay
        region &= mine
        drawn = region & (lab != value) & ~held[box]
        drawn[local] = False  # the clicked voxel is the click's, not a member's hypothesis
        if image is not None and not drawn.any():
            region |= torch.from_numpy(grow(image[box].numpy(), local)) & (lab != value) & ~held[box] & mine
        region[local] = True
        lab[region] = value
        pr = probs[(slice(None), *box)]
        pr[:, region] = 0.0
        pr[value, region] = 1.0
        if split and value == 0 and image is not None and plain is not None and int(plain[p]) != 0:
            sbox, _ = _box(p, label.shape, split_reach, slice_model=False)
            cut = _attached(image[sbox].numpy(), tuple(c - b.start for c, b in zip(p, sbox)), label[sbox],
                            int(plain[p]), held[sbox], SPLIT_MAX_SHARE)
            if NEAREST:
                cut &= _nearer(sbox, p, value, clicks, spacing)
            label[sbox][cut] = 0  # views (basic slicing): written into label and probs
            ps = probs[(slice(None), *sbox)]
            ps[:, cut] = 0.0
            ps[0, cut] = 1.0
    return label, probs


def within_reach(clicks: Clicks, shape: Sequence[int], reach: int | None = None,
                 spacing: Sequence[float] | None = None) -> torch.Tensor:
    """The voxels of a grid of ``shape`` within ``reach`` of a click (default: the larger of ``REGION_REACH``
    and ``SPLIT_REACH``, the boxes :func:`follow_clicks` works in; in mm with ``spacing``, as there): all a
    click request may change; elsewhere the plain answer stays."""
    reach = reach_per_axis(max(REGION_REACH, SPLIT_REACH) if reach is None else reach, spacing)
    out = torch.zeros(tuple(shape), dtype=torch.bool)
    for _, p in clicks.points:
        out[_box(p, shape, reach, slice_model=False)[0]] = True
    return out


def _nearer(box: tuple[slice, ...], point: Sequence[int], value: int, clicks: Clicks,
            spacing: Sequence[float] | None = None) -> torch.Tensor:
    """The voxels of ``box`` nearer to ``point`` (a click of label ``value``) than to every click of
    another label (Euclidean; in voxels, or in mm with ``spacing`` and ``PHYSICAL``): the part of the box
    that click may decide."""
    grids = np.ogrid[box]
    if spacing is None or not PHYSICAL:
        weights = [1] * len(grids)  # integers: exact comparisons
    else:  # squared mm over the finest axis's: exactly 1.0 on an isotropic grid
        weights = [(float(s) / min(float(t) for t in spacing)) ** 2 for s in spacing]
    mine = sum(w * (g - c) ** 2 for w, g, c in zip(weights, grids, point))
    out = np.ones(tuple(b.stop - b.start for b in box), dtype=bool)
    for v, q in clicks.points:
        if v != value:
            out &= mine < sum(w * (g - c) ** 2 for w, g, c in zip(weights, grids, q))
    return torch.from_numpy(out)


def _attached(image: np.ndarray, local: Sequence[int], lab: torch.Tensor, under: int,
              held: torch.Tensor, max_share: float = 1.0) -> torch.Tensor:
    """The voxels answered ``under`` (in ``lab``, the box's answer) that look like the clicked tissue
    (:func:`grow` from ``local``) and connect to the click through such voxels or through the background
    the clicks hold (the click's own neighbourhood is background already); not held voxels. Nothing when
    they would be more than ``max_share`` of the box's voxels answered ``under``: the image then does not
    tell the clicked tissue from the structure."""
    alike = torch.from_numpy(grow(image, local))
    path = alike & ((lab == under) | (held & (lab == 0)))
    path[tuple(local)] = True
    regions, _ = ndimage.label(path.numpy())
    cut = torch.from_numpy(regions == regions[tuple(local)]) & (lab == under) & ~held
    if int(cut.sum()) > max_share * int((lab == under).sum()):
        return torch.zeros_like(cut)
    return cut


def _blob(plain: torch.Tensor, point: Sequence[int], box: tuple[slice, ...], local: Sequence[int]) -> torch.Tensor:
    """The plain answer's connected component of the class at ``point``, in ``box``'s frame, if it lies
    wholly inside ``box`` (it may touch the image's border); else nothing."""
    inside = (plain[box] == plain[tuple(point)]).numpy()
    regions, _ = ndimage.label(inside)
    blob = regions == regions[tuple(local)]
    for axis, (b, size) in enumerate(zip(box, plain.shape)):
        lo = np.take(blob, 0, axis=axis).any() and b.start > 0
        hi = np.take(blob, -1, axis=axis).any() and b.stop < size
        if lo or hi:  # the component goes on beyond the reach: not a blob the click can speak for
            return torch.zeros(blob.shape, dtype=torch.bool)
    return torch.from_numpy(blob)
