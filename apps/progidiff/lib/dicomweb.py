"""A PACS as the studies folder: MONAI Label's DICOMweb datastore, offline, writing DICOM-SEG viewers read.

`--studies http://host/dicom-web` serves every series of the PACS. Differences from MONAI Label 0.8.5's own:
- Nothing is downloaded at start-up: MONAI Label fetches the dcmqi binary from the internet there (and fails
  offline) only to write SEG; this app writes SEG with pydicom-seg (`progidiff.dicom_seg`).
- What reaches the PACS: the final label (a person's) and, on every infer, the consensus and each proposal,
  as SEG series whose segments carry the organ's SNOMED CT code, name and colour, and whose series
  description says which proposal (k of N, tightest first), the prompt, the seed and the model version.
- Only people's labels count as labels: SEG series this app wrote (descriptions starting "ProGiDiff ") are
  proposals, never training targets, so the datastore's label search leaves them out.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

import pydicom
import SimpleITK as sitk
from dicomweb_client.session_utils import create_session_from_user_pass
from fastapi import HTTPException
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.datastore.utils.dicom import dicom_web_upload_dcm
from monailabel.interfaces.datastore import DefaultLabelTag

from progidiff.dicom_seg import SegSeries, write_dicom_seg
from progidiff.io_utils import atomic_file
from progidiff.labels import ORGAN_IDS, class_map_from_label_info, schema_organ, to_schema

logger = logging.getLogger(__name__)

MACHINE_SERIES = "ProGiDiff "  # series descriptions of the SEG this app writes from proposals
SERIES_DESCRIPTION = "dicom_series_description"  # label info key: send this label to the PACS under that name
CONTENT_DESCRIPTION = "dicom_content_description"  # label info key: what the series holds, in a sentence


class PeopleLabelsOnly:
    """The DICOMweb client, except that a search for SEG series leaves out the ones this app generated."""

    def __init__(self, client: DICOMwebClientX):
        self._client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def search_for_series(self, *args, search_filters: dict | None = None, **kwargs) -> list[dict]:
        found = self._client.search_for_series(*args, search_filters=search_filters, **kwargs)
        if (search_filters or {}).get("Modality") == "SEG":
            found = [s for s in found
                     if not str(pydicom.Dataset.from_json(s).get("SeriesDescription", "")).startswith(MACHINE_SERIES)]
        return found


def organ_values(label_info: dict[str, Any]) -> dict[str, int]:
    """Organ → value in a saved label map: named by the label's info (the app's `label_names`, a viewer's
    `label_info`), else the map is in the schema."""
    class_map = class_map_from_label_info(label_info or {})
    if class_map is None:
        return dict(ORGAN_IDS)
    values = {}
    for value, name in class_map.items():
        organ = schema_organ(name)
        if organ is None:
            raise ValueError(f"label value {value} is named {name!r}, which is no organ of the schema "
                             f"({', '.join(ORGAN_IDS)})")
        values[organ] = value
    return values


def to_schema_by_segment_names(label_file: str, seg_dir: str) -> None:
    """Rewrite a label map converted from a SEG (values = segment numbers) in the schema's values, by the
    segments' names; segments naming no organ of the schema become background."""
    seg = pydicom.dcmread(os.path.join(seg_dir, sorted(os.listdir(seg_dir))[0]), stop_before_pixels=True)
    class_map = {int(segment.SegmentNumber): str(segment.SegmentLabel) for segment in seg.SegmentSequence}
    image = sitk.ReadImage(label_file)
    relabelled = sitk.GetImageFromArray(to_schema(sitk.GetArrayFromImage(image), class_map))
    relabelled.CopyInformation(image)
    with atomic_file(label_file) as tmp:  # keeps the extension: SimpleITK writes by it
        sitk.WriteImage(relabelled, str(tmp))


class ProGiDiffDICOMWebDatastore(DICOMWebDatastore):
    def __init__(self, client: DICOMwebClientX, **kwargs):
        super().__init__(client, **kwargs)
        self._client = PeopleLabelsOnly(client)

    @classmethod
    def from_settings(cls, url: str) -> "ProGiDiffDICOMWebDatastore":
        """Built from MONAI Label's settings, as its own DICOMweb datastore is (user/password, URL prefixes, cache)."""
        session = None
        if settings.MONAI_LABEL_DICOMWEB_USERNAME and settings.MONAI_LABEL_DICOMWEB_PASSWORD:
            session = create_session_from_user_pass(settings.MONAI_LABEL_DICOMWEB_USERNAME,
                                                    settings.MONAI_LABEL_DICOMWEB_PASSWORD)
        client = DICOMwebClientX(url=url, session=session, qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
                                 wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
                                 stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX)
        cache = (settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or "").strip()
        return cls(client, search_filter=settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER, cache_path=cache or None,
                   fetch_by_frame=settings.MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME,
                   convert_to_nifti=settings.MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI)

    def get_image_uri(self, image_id: str) -> str:
        """The series' file in the local cache: the same path for every request (MONAI Label's returns the
        conversion's temporary file the first time), so the infer task's results cache recognises it."""
        uri = super().get_image_uri(image_id)
        cached = LocalDatastore.get_image_uri(self, image_id) if image_id in self._datastore.objects else ""
        return cached if cached and os.path.exists(cached) else uri

    def json(self) -> dict[str, Any]:
        """The listing (`/datastore/?output=all`): every series of the PACS, also those not fetched yet (MONAI
        Label's lists only what an infer has already fetched into its cache)."""
        listing = super().json()
        for series_uid in self.list_images():
            listing["objects"].setdefault(series_uid, {"image": {"ext": "", "info": {"SeriesInstanceUID": series_uid,
                                                                                     "fetched": False}},
                                                       "labels": {}})
        return listing

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        """A final label saved through this server is read as saved (with the organ names it came with); one
        that another tool stored in the PACS is fetched, converted, and brought into the schema by the names of
        its segments (a SEG numbers its segments 1..K in its own order)."""
        if label_tag == DefaultLabelTag.FINAL and image_id:
            saved = LocalDatastore.get_label_uri(self, image_id, label_tag)
            if saved and os.path.exists(saved):
                return saved
        uri = super().get_label_uri(label_id, label_tag, image_id)
        if label_tag == DefaultLabelTag.FINAL and uri and image_id:
            stored = LocalDatastore.get_label_uri(self, image_id, label_tag)  # the converted copy training reads
            to_schema_by_segment_names(stored, os.path.join(self._datastore.label_path(label_tag), label_id))
            return stored
        return uri

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any],
                   label_id: str = "") -> str:
        """Keep the label in the local cache; the final label, the consensus and the proposals also go to the
        PACS as DICOM-SEG (MONAI Label's own path for finals needs the dcmqi binary)."""
        label_info = dict(label_info or {})
        series = self._seg_series(label_tag, label_info)
        if series is not None:
            try:
                label_info["SeriesInstanceUID"] = self._send_seg(image_id, label_filename, label_info, series)
            except ValueError as error:  # the label's values or names are not organs of the schema
                raise HTTPException(400, f"label not saved: {error}") from None
        return LocalDatastore.save_label(self, image_id, label_filename, label_tag, label_info)

    @staticmethod
    def _seg_series(label_tag: str, label_info: dict[str, Any]) -> SegSeries | None:
        if label_tag == DefaultLabelTag.FINAL:
            return SegSeries("Final label", "FINAL", series_number=400, automatic=False)
        if label_info.get(SERIES_DESCRIPTION):
            number = 300 + int(label_tag.rsplit("_", 1)[1]) + 1 if label_tag.startswith("proposal_") else 300
            return SegSeries(str(label_info[SERIES_DESCRIPTION]), label_tag.replace("_", ""), series_number=number,
                             content_description=str(label_info.get(CONTENT_DESCRIPTION, "")))
        return None

    def _send_seg(self, image_id: str, label_filename: str, label_info: dict[str, Any], series: SegSeries) -> str:
        self.get_image_uri(image_id)  # the series' DICOM files are in the cache
        series_dir = os.path.join(self._datastore.image_path(), image_id)
        with tempfile.TemporaryDirectory() as tmp:
            seg = write_dicom_seg(label_filename, series_dir, organ_values(label_info), series,
                                  os.path.join(tmp, "seg.dcm"))
            if seg is None:
                return ""
            uid = dicom_web_upload_dcm(str(seg), self._client)
        logger.info("sent %s of %s to the PACS as DICOM-SEG series %s", series.description, image_id, uid)
        return uid
