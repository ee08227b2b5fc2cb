"""MONAI Label's DICOMweb datastore (``--studies http://.../dicom-web``, e.g. Orthanc), with labels that
mean the model's labels by segment name both ways: submitted labels before they are written as DICOM
SEG and uploaded, and SEGs fetched from the PACS (for training) after MONAI Label converts them.

* MONAI Label converts a submitted final label to a DICOM SEG and stores it in the PACS inside
  ``save_label``, before the app's ``on_save_label`` runs; so the remapping by segment name that the
  app does on a local studies folder (``labels.py``) happens here, on the uploaded file. The SEG's
  segments are named in the order of the values present (MONAI Label pairs them by position).
* MONAI Label reads a fetched SEG's pixels as segment numbers (1..N in the SEG's order, whatever the
  segments' names) on the grid of the SEG's frames, which cover only the slices a segment touches
  (dcmqi's default): the stored copy is remapped to the model's value of each segment's name and
  resampled onto the image's grid.
* A label id this datastore hands out is its image id (as in a studies folder); MONAI Label's DICOMweb
  datastore would take it for a SEG series id and fail (e.g. ``GET /datastore/label``). Only its own
  download of the PACS's SEGs, which passes the image id along, goes to the PACS.
* After a submitted label its cached list of labeled series is dropped, so the image stops being
  offered as the next sample at once rather than after the cache expiry.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import Any, Callable

import pydicom
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.datastore import DefaultLabelTag

from .labels import present_values, remap_label_file, seg_label_info, value_mapping

logger = logging.getLogger(__name__)


class SegDiffDICOMWebDatastore(DICOMWebDatastore):
    """`DICOMWebDatastore` whose final labels carry the model's values by segment name: ``save_label``
    remaps the submitted file before the upload, ``get_label_uri`` the copy of a SEG fetched from the PACS.

    Built by :meth:`adopt` from the datastore MONAI Label configured (client, cache folder, settings).
    """

    label_names: Callable[[], dict[str, int]]

    @classmethod
    def adopt(cls, datastore: DICOMWebDatastore, label_names: Callable[[], dict[str, int]]) -> DICOMWebDatastore:
        """Give ``datastore`` this class's behaviour (no new state besides ``label_names``)."""
        datastore.__class__ = cls
        datastore.label_names = label_names
        return datastore

    def save_label(
        self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any], label_id: str = ""
    ) -> str:
        label_info = dict(label_info or {})
        names = self.label_names()
        if label_tag == DefaultLabelTag.FINAL and names and not label_filename.endswith(".bin"):
            self._to_model_labels(label_filename, label_info, names)
        saved = super().save_label(image_id, label_filename, label_tag, label_info, label_id)
        DICOMWebDatastore.get_labeled_images.cache_clear()
        return saved

    @staticmethod
    def _to_model_labels(label_filename: str, label_info: dict[str, Any], names: dict[str, int]) -> None:
        """Remap the file by the names in ``label_info["label_info"]`` (if given) and describe its values."""
        given = label_info.get("label_info")
        given = given if isinstance(given, list) else []
        try:
            changes = {}
            if given:
                path = Path(label_filename)
                changes = remap_label_file(path, value_mapping(given, names), tmp_dir=path.parent) or {}
            values = present_values(label_filename)
        except Exception as e:  # unreadable: MONAI Label's conversion reports it
            logger.warning(f"segdiff: could not check label values of {label_filename}: {e}")
            return
        label_info["label_info"] = seg_label_info(values, names, given)
        label_info["segdiff_remapped"] = {str(k): v for k, v in changes.items()}
        if changes:
            logger.info(f"segdiff: submitted label values remapped by segment name {changes}")

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        if label_tag != DefaultLabelTag.FINAL or not image_id:
            return LocalDatastore.get_label_uri(self, label_id, label_tag)
        uri = super().get_label_uri(label_id, label_tag, image_id)
        stored = LocalDatastore.get_label_uri(self, image_id, label_tag)
        if uri and stored and os.path.realpath(uri) != stored:  # just converted from the PACS's SEG (a temp file)
            seg_dir = os.path.join(self._datastore.label_path(label_tag), label_id)
            self._seg_to_model_labels(seg_dir, stored, self.get_image_uri(image_id))
            os.unlink(uri)
            return stored
        return uri

    def _seg_to_model_labels(self, seg_dir: str, stored: str, image: str) -> None:
        """Rewrite ``stored`` (segment numbers of the SEG in ``seg_dir``) as the model's values by segment
        name, on ``image``'s grid."""
        import SimpleITK as sitk

        names = self.label_names()
        files = sorted(os.listdir(seg_dir)) if os.path.isdir(seg_dir) else []
        if not files:
            return
        seg = pydicom.dcmread(os.path.join(seg_dir, files[0]), stop_before_pixels=True)
        lower = {n.lower(): v for n, v in names.items()}
        labels = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence}
        mapping = {k: int(names.get(n, lower.get(n.lower(), 0))) for k, n in labels.items()} if names else {}
        label = sitk.ReadImage(stored)
        grid = sitk.ReadImage(image)
        label = sitk.Resample(label, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        changes = remap_label_file(self._replace(stored, label), mapping) if mapping else None
        logger.info(f"segdiff: {os.path.basename(stored)}: on the image grid, SEG segments -> model values {changes}")

    @staticmethod
    def _replace(path: str, image: Any) -> str:
        """Atomically replace the file ``path`` by the SimpleITK ``image``."""
        import SimpleITK as sitk

        folder = os.path.dirname(os.path.dirname(path))  # outside labels/<tag>/, which the datastore watches
        tmp = os.path.join(folder, f".segdiff-{uuid.uuid4().hex}-{os.path.basename(path)}")
        try:
            sitk.WriteImage(image, tmp, True)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path
