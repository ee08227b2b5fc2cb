"""MONAI Label's DICOMweb datastore (``--studies http://.../dicom-web``, e.g. Orthanc), with final labels
in a label set of their own, as in a studies folder: no submitted segment is ever rewritten to background.

* The label set (``labels.json``) lives in the app's folder for this datastore
  (``~/.cache/monai-segdiff/<key>/``); it starts as the served model's labels, and a segment with a new
  name extends it (``monai_segdiff.labelset``). Only the ``uncertain`` segment is dropped; values no
  ``label_info`` entry names are refused (422). The byte-exact upload is kept in that folder
  (``.segdiff/uploads/``) before anything else happens.
* MONAI Label converts a submitted final label to a DICOM SEG and stores it in the PACS inside
  ``save_label``, before the app's ``on_save_label`` runs; so the mapping by segment name happens here,
  on the uploaded file. The SEG's segments are named in the order of the values present (MONAI Label
  pairs them by position).
* MONAI Label reads a fetched SEG's pixels as segment numbers (1..N in the SEG's order, whatever the
  segments' names) on the grid of the SEG's frames, which cover only the slices a segment touches
  (dcmqi's default): the stored copy is mapped to the label set's value of each segment's name (new names
  extend the set) and resampled onto the image's grid.
* A label id this datastore hands out is its image id (as in a studies folder); MONAI Label's DICOMweb
  datastore would take it for a SEG series id and fail (e.g. ``GET /datastore/label``). Only its own
  download of the PACS's SEGs, which passes the image id along, goes to the PACS.
* After a submitted label its cached list of labeled series is dropped, so the image stops being
  offered as the next sample at once rather than after the cache expiry.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
from fastapi import HTTPException
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.datastore import DefaultLabelTag

from monai_segdiff import labelstore
from monai_segdiff.errors import InputError
from monai_segdiff.labelset import LABELS_FILE, LabelSet, SegmentMapping, extend_label_set, write_label

from .labels import present_values, seg_label_info

logger = logging.getLogger(__name__)


class SegDiffDICOMWebDatastore(DICOMWebDatastore):
    """`DICOMWebDatastore` whose final labels carry the label set's values by segment name: ``save_label``
    maps the submitted file before the upload, ``get_label_uri`` the copy of a SEG fetched from the PACS.

    Built by :meth:`adopt` from the datastore MONAI Label configured (client, cache folder, settings).
    """

    label_folder: str
    model_labels: Callable[[], list[str]]

    @classmethod
    def adopt(cls, datastore: DICOMWebDatastore, label_folder: str,
              model_labels: Callable[[], list[str]]) -> DICOMWebDatastore:
        """Give ``datastore`` this class's behaviour: its label set in ``label_folder``, started from
        ``model_labels()`` (the served model's foreground names)."""
        datastore.__class__ = cls
        datastore.label_folder, datastore.model_labels = label_folder, model_labels
        return datastore

    def label_set(self, names: list[str] | None = None) -> tuple[LabelSet, SegmentMapping | None]:
        """The label set, extended by ``names`` (a new set starts from the model's labels)."""
        first = not (Path(self.label_folder) / LABELS_FILE).is_file()
        return extend_label_set(self.label_folder, names, bootstrap=self.model_labels() if first else ())

    def save_label(
        self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any], label_id: str = ""
    ) -> str:
        label_info = dict(label_info or {})
        if label_tag == DefaultLabelTag.FINAL and not label_filename.endswith(".bin"):
            self._to_label_set(image_id, label_filename, label_info)
        saved = super().save_label(image_id, label_filename, label_tag, label_info, label_id)
        DICOMWebDatastore.get_labeled_images.cache_clear()
        return saved

    def _to_label_set(self, image_id: str, label_filename: str, label_info: dict[str, Any]) -> None:
        """Keep the upload, map the file's values to the label set by the names in ``label_info["label_info"]``
        and describe the result (``label_info["segdiff"]``, the answer to Submit Label)."""
        given = label_info.get("label_info")
        given = given if isinstance(given, list) and given else []
        try:
            values = present_values(label_filename)
        except Exception as e:  # unreadable: MONAI Label's conversion reports it
            logger.warning(f"segdiff: could not check label values of {label_filename}: {e}")
            return
        try:
            names = labelstore.submitted_names({"label_info": given}, label_filename) if given else None
            if names is not None:
                labelstore.check_named(values, names)
            uploaded = labelstore.keep_upload(self.label_folder, label_filename, DefaultLabelTag.FINAL.value,
                                              f"{image_id}{''.join(Path(label_filename).suffixes)}", label_info)
            labels, mapping = self.label_set(names)
            if names is None:
                labelstore.check_in_set(values, labels)
        except InputError as e:
            raise HTTPException(422, str(e)) from None
        if mapping is not None:  # the upload's folder is MONAI Label's temporary one: not watched
            write_label(label_filename, label_filename, mapping.values, Path(label_filename).parent)
            values = present_values(label_filename)
        label_info["label_info"] = seg_label_info(values, labels.to_dict(), given)
        label_info["segdiff"] = labelstore.save_answer(labels, mapping, {"foreground_voxels": len(values)}, uploaded)
        if mapping is not None and mapping.changes:
            logger.info(f"segdiff: submitted label values mapped by segment name {mapping.changes}")

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        if label_tag != DefaultLabelTag.FINAL or not image_id:
            return LocalDatastore.get_label_uri(self, label_id, label_tag)
        uri = super().get_label_uri(label_id, label_tag, image_id)
        stored = LocalDatastore.get_label_uri(self, image_id, label_tag)
        if uri and stored and os.path.realpath(uri) != stored:  # just converted from the PACS's SEG (a temp file)
            seg_dir = os.path.join(self._datastore.label_path(label_tag), label_id)
            self._seg_to_label_set(seg_dir, stored, self.get_image_uri(image_id))
            os.unlink(uri)
            return stored
        return uri

    def _seg_to_label_set(self, seg_dir: str, stored: str, image: str) -> None:
        """Rewrite ``stored`` (segment numbers of the SEG in ``seg_dir``) as the label set's values by
        segment name (new names extend the set), on ``image``'s grid."""
        files = sorted(os.listdir(seg_dir)) if os.path.isdir(seg_dir) else []
        if not files:
            return
        seg = pydicom.dcmread(os.path.join(seg_dir, files[0]), stop_before_pixels=True)
        segments = sorted((int(s.SegmentNumber), str(s.SegmentLabel)) for s in seg.SegmentSequence)
        _, mapping = self.label_set([name for _, name in segments])
        by_number = {number: mapping.values[i + 1] for i, (number, _) in enumerate(segments)}
        outside = os.path.dirname(os.path.dirname(stored))  # not labels/<tag>/, which the datastore watches
        write_label(stored, stored, by_number, outside, grid=image)
        logger.info(f"segdiff: {os.path.basename(stored)}: on the image grid, SEG segments -> label set values {by_number}")
