"""Adult organ volumes a mask can plausibly have, and the warnings a result carries when it falls outside them.

A whole organ far outside the range of adults is more often a wrong mask than an unusual patient, so the
result says so and the annotator looks before saving it. The ranges (ml) span normal adults with margins
for common disease (normal adult volumes by CT volumetry: liver ~1,200–1,800, spleen ~150–250, each kidney
~120–200, pancreas ~60–100, gallbladder ~20–50, adrenal gland ~4–8); a spleen over 600 ml is splenomegaly,
possible but worth a look. An organ that reaches the scan's first or last slice may be cut by the field of
view: only a volume too large is flagged then. Vessels, bowel and the spine are left out: how much of them
a scan holds depends on its field of view.
"""

from __future__ import annotations

ADULT_VOLUME_ML: dict[str, tuple[float, float]] = {
    "liver": (700, 3500),
    "spleen": (40, 600),
    "kidney_left": (60, 350),
    "kidney_right": (60, 350),
    "gallbladder": (5, 200),
    "stomach": (50, 2500),
    "pancreas": (25, 200),
    "adrenal_gland_left": (1, 25),
    "adrenal_gland_right": (1, 25),
    "urinary_bladder": (20, 1000),
}


def volume_warnings(volumes_ml: dict[str, float], cut_by_scan: dict[str, bool]) -> list[str]:
    """A sentence per organ whose consensus volume lies outside `ADULT_VOLUME_ML` (too small only counts when the
    organ is not `cut_by_scan`); an organ found nowhere is no warning (the prompt may name an absent organ)."""
    warnings = []
    for organ, volume in volumes_ml.items():
        if organ not in ADULT_VOLUME_ML or volume <= 0:
            continue
        low, high = ADULT_VOLUME_ML[organ]
        if volume > high or (volume < low and not cut_by_scan.get(organ, False)):
            warnings.append(f"the {organ.replace('_', ' ')} consensus is {volume:.0f} ml, outside {low:g}–{high:g} ml "
                            "(adults): check the mask before saving it")
    return warnings
