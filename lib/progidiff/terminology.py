"""What each organ is called in DICOM and how viewers should draw it: SNOMED CT codes and one colour per organ.

DICOM-SEG segments carry a coded anatomy (category "Anatomical Structure", type = the organ, with a
laterality modifier for paired organs) and a recommended display colour, so that a PACS viewer names
and colours every organ on its own instead of showing each segment red (Project-MONAI/MONAILabel#1751).
The same colours go into the `.seg.nrrd` files 3D Slicer receives.
"""

from __future__ import annotations

from dataclasses import dataclass

from .labels import ORGAN_IDS

SCT = "SCT"
ANATOMICAL_STRUCTURE = ("123037004", SCT, "Anatomical Structure")
LEFT = ("7771000", SCT, "Left")
RIGHT = ("24028007", SCT, "Right")


@dataclass(frozen=True)
class OrganTerm:
    code: tuple[str, str, str]  # (CodeValue, CodingSchemeDesignator, CodeMeaning)
    rgb: tuple[int, int, int]
    laterality: tuple[str, str, str] | None = None

    @property
    def display_name(self) -> str:
        side = f"{self.laterality[2].lower()} " if self.laterality else ""
        return f"{side}{self.code[2].lower()}"


# Colours: 3D Slicer's GenericAnatomyColors where it has the organ, changed where two organs would share one.
ORGAN_TERMS: dict[str, OrganTerm] = {
    "liver": OrganTerm(("10200004", SCT, "Liver"), (221, 130, 101)),
    "spleen": OrganTerm(("78961009", SCT, "Spleen"), (157, 108, 162)),
    "kidney_left": OrganTerm(("64033007", SCT, "Kidney"), (185, 102, 83), LEFT),
    "kidney_right": OrganTerm(("64033007", SCT, "Kidney"), (236, 168, 120), RIGHT),
    "gallbladder": OrganTerm(("28231008", SCT, "Gallbladder"), (139, 150, 98)),
    "stomach": OrganTerm(("69695003", SCT, "Stomach"), (216, 191, 216)),
    "pancreas": OrganTerm(("15776009", SCT, "Pancreas"), (249, 180, 111)),
    "adrenal_gland_left": OrganTerm(("23451007", SCT, "Adrenal gland"), (244, 214, 49), LEFT),
    "adrenal_gland_right": OrganTerm(("23451007", SCT, "Adrenal gland"), (200, 160, 30), RIGHT),
    "aorta": OrganTerm(("15825003", SCT, "Aorta"), (224, 97, 76)),
    "inferior_vena_cava": OrganTerm(("64131007", SCT, "Inferior vena cava"), (0, 151, 206)),
    "portal_vein_and_splenic_vein": OrganTerm(("32764006", SCT, "Portal vein"), (0, 112, 165)),
    "duodenum": OrganTerm(("38848004", SCT, "Duodenum"), (255, 253, 229)),
    "colon": OrganTerm(("71854001", SCT, "Colon"), (204, 168, 143)),
    "small_bowel": OrganTerm(("30315005", SCT, "Small intestine"), (205, 167, 142)),
    "urinary_bladder": OrganTerm(("89837001", SCT, "Urinary bladder"), (222, 154, 132)),
    "vertebrae": OrganTerm(("421060004", SCT, "Vertebral column"), (241, 214, 145)),
}
assert set(ORGAN_TERMS) == set(ORGAN_IDS), "every organ of the schema needs a term"
assert len({t.rgb for t in ORGAN_TERMS.values()}) == len(ORGAN_TERMS), "one colour per organ"


def organ_rgb(organ: str) -> tuple[int, int, int]:
    return ORGAN_TERMS[organ].rgb
