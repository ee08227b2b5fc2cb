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
"""

from __future__ import annotations

import random
from pathlib import Path

__all__ = [
    "IMAGE_SUFFIXES",
    "DataError",
    "datalist",
    "find_label",
    "image_id",
    "label_tags",
    "labelled",
    "list_images",
    "rater_tags",
    "split",
    "unlabelled",
]

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".png", ".jpg", ".jpeg")
FINAL_TAG = "final"
NON_RATER_TAGS = (FINAL_TAG, "original")
_SEGMENTATION_SUFFIX = ".seg.nrrd"


class DataError(ValueError):
    """A studies folder that cannot be used (missing, not a directory, no images)."""


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
    """One dict per image: ``{"id", "image", "label"?, "raters"?}`` with absolute path strings.

    ``label`` is present only for images labelled under ``tag``; ``raters`` (rater labels in
    :func:`rater_tags` order, excluding ``tag`` itself) only when ``with_raters`` and at least one exists.
    """
    root = _studies_dir(studies)
    images = list_images(root)
    if not images:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in studies folder: {root}")
    raters = [t for t in rater_tags(root) if t != tag] if with_raters else []
    items = []
    for image in images:
        item: dict = {"id": image_id(image), "image": str(image.resolve())}
        label = find_label(root, image, tag)
        if label is not None:
            item["label"] = str(label.resolve())
        found = [find_label(root, image, t) for t in raters]
        rater_paths = [str(p.resolve()) for p in found if p is not None]
        if rater_paths:
            item["raters"] = rater_paths
        items.append(item)
    return items


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
