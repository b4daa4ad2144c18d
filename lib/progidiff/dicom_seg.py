"""Label maps → DICOM-SEG that a PACS and its viewers understand: organs coded, named and coloured.

Written with pydicom-seg (no dcmqi binary, nothing downloaded): one segment per organ present, with its
SNOMED CT code (and laterality), its own recommended display colour (`terminology`), the algorithm that
made it, and a series description saying what the series is (e.g. which proposal of how many).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pydicom_seg
import SimpleITK as sitk

from .terminology import ANATOMICAL_STRUCTURE, ORGAN_TERMS

logger = logging.getLogger(__name__)

ALGORITHM = "ProGiDiff"


@dataclass(frozen=True)
class SegSeries:
    """What a SEG series says about itself."""

    description: str  # SeriesDescription (64 characters kept), e.g. "ProGiDiff proposal 2 of 5 | seed 0 | model ..."
    content_label: str  # ContentLabel: CS, upper case, at most 16 characters, e.g. "PROPOSAL2"
    content_description: str = ""  # ContentDescription (64 characters kept), e.g. "1 is the tightest, 5 the most generous"
    series_number: int = 300
    automatic: bool = True  # False: a person corrected it (a final label)


def _code(code: tuple[str, str, str]) -> dict[str, str]:
    return {"CodeValue": code[0], "CodingSchemeDesignator": code[1], "CodeMeaning": code[2]}


def segment_attributes(values: dict[str, int], automatic: bool = True) -> list[dict]:
    """dcmqi-style attributes of one segment per organ (`values`: organ → its value in the label map)."""
    attributes = []
    for organ, value in sorted(values.items(), key=lambda item: item[1]):
        term = ORGAN_TERMS[organ]
        attribute = {
            "labelID": int(value),
            "SegmentLabel": organ,
            "SegmentDescription": term.display_name,
            "SegmentAlgorithmType": "AUTOMATIC" if automatic else "SEMIAUTOMATIC",
            "SegmentAlgorithmName": ALGORITHM,
            "SegmentedPropertyCategoryCodeSequence": _code(ANATOMICAL_STRUCTURE),
            "SegmentedPropertyTypeCodeSequence": _code(term.code),
            "recommendedDisplayRGBValue": list(term.rgb),
        }
        if term.laterality:
            attribute["SegmentedPropertyTypeModifierCodeSequence"] = _code(term.laterality)
        attributes.append(attribute)
    return attributes


def write_dicom_seg(label_file: str | Path, series_dir: str | Path, values: dict[str, int], series: SegSeries,
                    output: str | Path) -> Path | None:
    """Write `label_file` (a label map on the grid of the DICOM series in `series_dir`) as DICOM-SEG to `output`.

    Only organs present in the map get a segment; an empty map writes nothing and returns None.
    """
    mask = sitk.Cast(sitk.ReadImage(str(label_file)), sitk.sitkUInt16)
    present = set(np.unique(sitk.GetArrayViewFromImage(mask)).tolist()) - {0}
    values = {organ: value for organ, value in values.items() if value in present}
    if not values:
        logger.info("no organ in the label map: no DICOM-SEG written for %r", series.description)
        return None
    unknown = present - set(values.values())
    if unknown:
        raise ValueError(f"label values {sorted(unknown)} name no organ; known: {values}")
    template = pydicom_seg.template.from_dcmqi_metainfo({
        "ContentCreatorName": ALGORITHM,
        "ClinicalTrialSeriesID": "Session1",
        "ClinicalTrialTimePointID": "1",
        "SeriesDescription": series.description[:64],
        "SeriesNumber": str(series.series_number),
        "InstanceNumber": "1",
        "ContentLabel": series.content_label[:16].upper(),
        "ContentDescription": (series.content_description or series.description)[:64],
        "BodyPartExamined": "",
        "segmentAttributes": [segment_attributes(values, series.automatic)],
    })
    for segment in template.SegmentSequence:
        # DICOM nests the laterality inside the type's code item (Segment Description macro); pydicom-seg
        # leaves it beside it, where viewers do not look.
        if "SegmentedPropertyTypeModifierCodeSequence" in segment:
            segment.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = (
                segment.SegmentedPropertyTypeModifierCodeSequence)
            del segment.SegmentedPropertyTypeModifierCodeSequence
    writer = pydicom_seg.MultiClassWriter(template=template, inplane_cropping=False, skip_empty_slices=True,
                                          skip_missing_segment=True)
    sources = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in sorted(Path(series_dir).iterdir())
               if f.is_file()]
    dataset = writer.write(mask, sources)
    dataset.save_as(str(output))
    return Path(output)
