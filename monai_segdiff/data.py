"""Studies folder <-> datalist.

A studies folder uses MONAI Label's local datastore layout::

    studies/
        case_a.nii.gz                  images at the top level
        case_b.nrrd
        labels/
            final/case_a.nii.gz        reference labels, same name (any image suffix)
            rater1/case_a.nii.gz       extra annotators, one tag each
            original/...               MONAI Label's saved predictions (not a rater)

The datalist is a list of dicts ``{"id", "image", "label"?, "raters"?}`` with absolute path strings,
ready for MONAI dictionary transforms. No ``monailabel`` import here: the CLI and the app share it.

**2D images.** PNG / JPG (RGB -> 3 image channels, grayscale -> 1) and 2D NIfTI are images like any
other; a model trained on them segments 2D images whole (no slicing). Masks hold the label values
0, 1, 2, ... (8-bit PNG, one gray value or palette index per pixel); a mask with only the values 0 and
255 -- the usual binary mask -- is read as 0/1. Save masks as PNG, never JPG (lossy compression
changes values along the edges).

**Multi-channel images** (several co-registered volumes per case, e.g. MRI sequences) are given
either as one file with a channel axis (a 4D NIfTI ``X x Y x Z x C``; the only form MONAI Label's
datastore and the app can serve), or as one file per channel with nnU-Net's naming convention::

    studies/
        channels.json                  ["flair", "t1ce", "t2"]  (or nnU-Net's {"0": "flair", ...})
        case_a_0000.nii.gz             channel 0 of case "case_a"
        case_a_0001.nii.gz             channel 1
        case_a_0002.nii.gz             channel 2
        labels/final/case_a.nii.gz     the label is named after the case

The per-channel names are grouped only when ``channels.json`` declares the channels (so numbered single
images such as ``scan_0001.png`` stay separate cases); every case must then have every channel, and its
``image`` is the list of channel files in channel order, which ``LoadImaged`` stacks as channels.

**Partial labels** (annotate only some slices, issue 26): ``labels/<tag>/annotated_slices.json`` records,
per case id, the slices of the image array that were annotated, ``{"case_a": {"axis": 2, "slices": [12,
30, 41]}}`` (``axis``: the image array's axis, 0..2, across which the slices lie). The rest of that case's
label is *unannotated*, not background: training learns only from the recorded slices and from slices
where the label holds foreground (a structure drawn outside the recorded slices was annotated too).
:func:`datalist` attaches the record as the item's ``annotated``; a case without a record is annotated whole.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from pathlib import Path

from .atomic import atomic_write
from .errors import DataError

__all__ = [
    "ANNOTATED_FILE",
    "ANNOTATE_REQUEST",
    "CHANNELS_FILE",
    "IMAGE_SUFFIXES",
    "DataError",
    "annotated_slices",
    "case_id",
    "channel_names",
    "datalist",
    "find_label",
    "image_id",
    "label_tags",
    "labelled",
    "list_images",
    "rater_tags",
    "record_annotated_slices",
    "split",
    "unlabelled",
    "with_annotated",
]

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".png", ".jpg", ".jpeg")
FINAL_TAG = "final"
CHANNELS_FILE = "channels.json"
_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")  # nnU-Net: <case>_<4-digit channel>
NON_RATER_TAGS = (FINAL_TAG, "original")
_SEGMENTATION_SUFFIX = ".seg.nrrd"
ANNOTATED_FILE = "annotated_slices.json"  # under labels/<tag>/: the slices of partial labels (module doc)
ANNOTATE_REQUEST = "segdiff_annotate"  # an image's datastore info: slices handed out to annotate, not yet submitted


def _studies_dir(studies: str | Path) -> Path:
    path = Path(studies).expanduser()
    if not path.exists():
        raise DataError(f"studies folder does not exist: {path}")
    if not path.is_dir():
        raise DataError(f"studies folder is not a directory: {path}")
    return path


def _image_suffix(name: str) -> str | None:
    lower = name.lower()
    for suffix in IMAGE_SUFFIXES:  # ".nii.gz" is tried before ".nii"
        if lower.endswith(suffix) and len(name) > len(suffix):
            return suffix
    return None


def _is_image_file(path: Path) -> bool:
    name = path.name
    if name.startswith(".") or name.lower().endswith(_SEGMENTATION_SUFFIX):
        return False
    return path.is_file() and _image_suffix(name) is not None


def list_images(studies: str | Path) -> list[Path]:
    """Image files at the top level of ``studies``, sorted by name (no ``*.seg.nrrd``, no hidden files)."""
    root = _studies_dir(studies)
    return sorted((p for p in root.iterdir() if _is_image_file(p)), key=lambda p: p.name)


def image_id(path: str | Path) -> str:
    """File name without its image suffix: ``.../phantom_000.nii.gz`` -> ``phantom_000``."""
    name = Path(path).name
    if name.lower().endswith(_SEGMENTATION_SUFFIX) and len(name) > len(_SEGMENTATION_SUFFIX):
        return name[: -len(_SEGMENTATION_SUFFIX)]
    suffix = _image_suffix(name)
    if suffix is not None:
        return name[: -len(suffix)]
    return Path(name).stem


def case_id(image: str | Path | list[str] | tuple[str, ...]) -> str:
    """Case id of an image file (:func:`image_id`) or of a list of per-channel files (the first file's
    id without its ``_0000`` channel suffix)."""
    if isinstance(image, (list, tuple)):
        if len(image) == 1:
            return image_id(image[0])
        first = image_id(image[0])
        match = _CHANNEL_FILE.match(first)
        return match.group("case") if match else first
    return image_id(image)


def channel_names(studies: str | Path) -> list[str]:
    """Channel names declared in ``<studies>/channels.json`` (a list, or nnU-Net's ``{"0": name}``);
    ``[]`` without the file (then every image file is a case of its own)."""
    path = _studies_dir(studies) / CHANNELS_FILE
    if not path.is_file():
        return []
    try:
        raw = json.loads(path.read_text())
        if isinstance(raw, dict):
            raw = [raw[k] for k in sorted(raw, key=int)]
        names = [str(n) for n in raw]
    except (ValueError, TypeError, KeyError) as e:
        raise DataError(f"{path} must list the channel names, e.g. [\"flair\", \"t1\"]: {e}") from e
    if not names:
        raise DataError(f"{path} lists no channel")
    return names


def _cases(root: Path, images: list[Path]) -> list[tuple[str, Path | list[Path]]]:
    """``(case id, image file or per-channel files)``; channel files grouped when channels are declared."""
    channels = channel_names(root)
    if not channels:
        return [(image_id(p), p) for p in images]
    groups: dict[str, dict[int, Path]] = {}
    for p in images:
        match = _CHANNEL_FILE.match(image_id(p))
        case, channel = (match.group("case"), int(match.group("channel"))) if match else (image_id(p), -1)
        if case in groups and (channel in groups[case] or channel == -1 or -1 in groups[case]):
            raise DataError(f"{root}: more than one file for channel {channel} of case {case!r}")
        groups.setdefault(case, {})[channel] = p
    out: list[tuple[str, Path | list[Path]]] = []
    for case, files in sorted(groups.items()):
        if -1 in files:  # one file holding every channel (e.g. a 4D NIfTI)
            out.append((case, files[-1]))
            continue
        missing = [f"{c:04d}" for c in range(len(channels)) if c not in files]
        extra = [f"{c:04d}" for c in files if c >= len(channels)]
        if missing or extra:
            raise DataError(
                f"case {case!r} in {root}: {CHANNELS_FILE} declares {len(channels)} channels {channels}; "
                + (f"missing file(s) {case}_{{{','.join(missing)}}}" if missing else f"unexpected channel(s) {extra}")
            )
        out.append((case, [files[c] for c in range(len(channels))]))
    return out


def label_tags(studies: str | Path) -> list[str]:
    """Sub-folders of ``studies/labels``, sorted, with ``final`` first when present."""
    labels = _studies_dir(studies) / "labels"
    if not labels.is_dir():
        return []
    tags = sorted(p.name for p in labels.iterdir() if p.is_dir() and not p.name.startswith("."))
    if FINAL_TAG in tags:
        tags.remove(FINAL_TAG)
        tags.insert(0, FINAL_TAG)
    return tags


def rater_tags(studies: str | Path) -> list[str]:
    """Annotator tags: every label tag except ``final`` and ``original``."""
    return [t for t in label_tags(studies) if t not in NON_RATER_TAGS]


def _is_label_file(path: Path) -> bool:
    name = path.name
    return not name.startswith(".") and path.is_file() and _image_suffix(name) is not None


def find_label(studies: str | Path, image: str | Path, tag: str = FINAL_TAG) -> Path | None:
    """The label of ``image`` under ``labels/<tag>/`` (same id, any image suffix incl. ``.seg.nrrd``).

    The file with the image's own name wins; otherwise the first match by name; ``None`` if absent.
    """
    folder = _studies_dir(studies) / "labels" / tag
    if not folder.is_dir():
        return None
    same_name = folder / Path(image).name
    if _is_label_file(same_name):
        return same_name
    wanted = image_id(image)
    matches = sorted(p for p in folder.iterdir() if _is_label_file(p) and image_id(p) == wanted)
    return matches[0] if matches else None


def datalist(studies: str | Path, tag: str = FINAL_TAG, with_raters: bool = True) -> list[dict]:
    """One dict per case: ``{"id", "image", "label"?, "raters"?}`` with absolute path strings.

    ``image`` is one path, or the list of per-channel paths of a case in the per-channel layout (see the
    module doc). ``label`` is present only for images labelled under ``tag``; ``raters`` (rater labels
    in :func:`rater_tags` order, excluding ``tag`` itself) only when ``with_raters`` and at least one exists.
    """
    root = _studies_dir(studies)
    images = list_images(root)
    if not images:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in studies folder: {root}")
    raters = [t for t in rater_tags(root) if t != tag] if with_raters else []
    partial = annotated_slices(root, tag)
    items = []
    for case, files in _cases(root, images):
        if isinstance(files, list):
            image = root / f"{case}{_image_suffix(files[0].name)}"  # the name its labels have
            item: dict = {"id": case, "image": [str(f.resolve()) for f in files]}
        else:
            image = files
            item = {"id": case, "image": str(files.resolve())}
        label = find_label(root, image, tag)
        if label is not None:
            item["label"] = str(label.resolve())
            if case in partial:
                item["annotated"] = partial[case]
        found = [find_label(root, image, t) for t in raters]
        rater_paths = [str(p.resolve()) for p in found if p is not None]
        if rater_paths:
            item["raters"] = rater_paths
        items.append(item)
    return items


def _check_annotated(case: str, entry: object) -> dict:
    """A record's entry as ``{"axis": int, "slices": sorted unique ints}``; ``DataError`` if malformed."""
    ok = isinstance(entry, dict) and entry.get("axis") in (0, 1, 2) and isinstance(entry.get("slices"), list)
    slices = entry.get("slices") if ok else None
    if not ok or not slices or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in slices):
        raise DataError(f"{ANNOTATED_FILE}: the entry of {case!r} must be {{\"axis\": 0|1|2, \"slices\": "
                        f"[slice indices >= 0, at least one]}}, got {entry!r}")
    return {"axis": int(entry["axis"]), "slices": sorted(set(slices))}


def annotated_slices(studies: str | Path, tag: str = FINAL_TAG) -> dict[str, dict]:
    """``{case id: {"axis", "slices"}}`` of the partial labels under ``labels/<tag>/`` (module doc); ``{}``
    without a record. ``DataError`` for a record that cannot be read or has malformed entries."""
    path = _studies_dir(studies) / "labels" / tag / ANNOTATED_FILE
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path} must hold an object {{case id: {{\"axis\", \"slices\"}}}}")
    return {str(case): _check_annotated(str(case), entry) for case, entry in raw.items()}


def record_annotated_slices(studies: str | Path, case: str, axis: int, slices: Sequence[int] | None,
                            tag: str = FINAL_TAG) -> dict[str, dict]:
    """Record (or with ``slices=None`` remove) which slices of ``case``'s label under ``labels/<tag>/``
    were annotated; written atomically. Returns the whole record."""
    record = annotated_slices(studies, tag)
    if slices is None:
        record.pop(case, None)
    else:
        record[case] = _check_annotated(case, {"axis": axis, "slices": [int(i) for i in slices]})
    path = _studies_dir(studies) / "labels" / tag / ANNOTATED_FILE
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n"))
    return record


def with_annotated(items: list[dict], studies: str | Path, tag: str = FINAL_TAG) -> list[dict]:
    """``items`` (e.g. a MONAI Label datastore's datalist, with ``id``) with each labelled item's record of
    annotated slices attached as :func:`datalist` does."""
    partial = annotated_slices(studies, tag)
    return [dict(it, annotated=partial[it["id"]]) if it.get("label") and it.get("id") in partial else it
            for it in items]


def labelled(items: list[dict]) -> list[dict]:
    """Items that have a ``label``."""
    return [item for item in items if item.get("label")]


def unlabelled(items: list[dict]) -> list[dict]:
    """Items without a ``label``."""
    return [item for item in items if not item.get("label")]


def split(items: list[dict], val_fraction: float, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Deterministic train/validation split; each part keeps the input order.

    The split depends only on the item ids (not their order) and ``seed``. With at least two items and
    ``val_fraction > 0`` validation gets at least one item and training keeps at least one.
    """
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
    n = len(items)
    if n < 2 or val_fraction == 0.0:
        return list(items), []
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    keys = [str(item.get("id", item.get("image", i))) for i, item in enumerate(items)]
    order = sorted(range(n), key=lambda i: (keys[i], i))
    random.Random(seed).shuffle(order)
    val_indices = set(order[:n_val])
    train = [item for i, item in enumerate(items) if i not in val_indices]
    val = [item for i, item in enumerate(items) if i in val_indices]
    return train, val
