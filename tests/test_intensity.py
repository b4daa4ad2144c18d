"""MR intensity handling: a study's scale and offset do not matter once it is rescaled per study; CT is left in HU;
the anatomy loss used for adaptation gives a small organ as much pull as a large one."""

from __future__ import annotations

import numpy as np
import torch

from progidiff.intensity import PercentileNormalisation, normalisation_for
from progidiff.labels import ORGAN_IDS
from progidiff.phantoms import make_phantom
from progidiff.training import anatomy_loss


def test_an_mr_study_rescaled_per_study_does_not_depend_on_the_scanners_scale_or_offset():
    mr = make_phantom(3).mr.astype(np.float32)
    rescale = normalisation_for("MR")
    assert rescale is not None and normalisation_for("CT") is None  # HU are calibrated: CT as it is
    reference = rescale(mr)
    other_scanner = rescale(mr * 3.7 + 250.0)
    np.testing.assert_allclose(other_scanner, reference, atol=1e-2)
    low, high = np.percentile(reference, [rescale.lower, rescale.upper])
    np.testing.assert_allclose([low, high], [rescale.b_min, rescale.b_max], atol=1.0)
    assert isinstance(rescale(torch.from_numpy(mr)), torch.Tensor) and isinstance(reference, np.ndarray)


def test_the_normalisation_is_recorded_as_a_dict_and_read_back():
    rescale = PercentileNormalisation(lower=2.0, upper=98.0, b_min=0.0, b_max=300.0)
    assert PercentileNormalisation.from_dict(rescale.to_dict()) == rescale
    assert PercentileNormalisation.from_dict(None) is None


def test_the_balanced_anatomy_loss_pulls_a_small_organ_as_hard_as_a_large_one():
    """What adapting the CT model to MR meets: organ logits far below zero (≈ −30 on mr_a) on organs that are
    there. The pixel-mean BCE gives the small organ a pull in proportion to its area; the balanced one does not."""
    size = 64
    label = torch.zeros(1, 1, size, size)
    label[..., 4:44, 4:44] = ORGAN_IDS["liver"]  # 1600 pixels
    label[..., 50:56, 50:56] = ORGAN_IDS["spleen"]  # 36 pixels
    pulls = {}
    for balanced in (False, True):
        logits = torch.full((1, len(ORGAN_IDS), size, size), -30.0, requires_grad=True)
        anatomy_loss(logits, label, balanced).backward()
        grad = logits.grad[0]
        liver = grad[ORGAN_IDS["liver"] - 1][label[0, 0] == ORGAN_IDS["liver"]].abs().sum()
        spleen = grad[ORGAN_IDS["spleen"] - 1][label[0, 0] == ORGAN_IDS["spleen"]].abs().sum()
        pulls[balanced] = float(spleen / liver)
    assert pulls[False] < 0.05  # ≈ 36 / 1600: the spleen hardly counts
    assert pulls[True] > 0.5  # ≈ 1: each organ present pulls alike
