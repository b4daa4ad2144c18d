"""Organ volumes outside the adult range are flagged; a small organ cut by the scan is not."""

from progidiff.plausibility import ADULT_VOLUME_ML, volume_warnings


def test_implausible_volumes_are_flagged_and_partial_organs_are_not():
    volumes = {"spleen": 713.0, "liver": 1500.0, "kidney_left": 20.0, "kidney_right": 20.0, "aorta": 5.0,
               "pancreas": 0.0}
    cut = {"kidney_right": True}
    warnings = volume_warnings(volumes, cut)
    assert len(warnings) == 2
    assert "spleen consensus is 713 ml, outside 40–600 ml" in warnings[0]
    assert "kidney left consensus is 20 ml" in warnings[1]  # the right one may be cut by the field of view
    assert volume_warnings({o: (low + high) / 2 for o, (low, high) in ADULT_VOLUME_ML.items()}, {}) == []
