import torch

from progidiff.metrics import bracketing, dice, generalized_energy_distance, hd95
from progidiff.proposals import summarise


def _square(offset: int) -> torch.Tensor:
    m = torch.zeros(10, 10)
    m[2 + offset : 6 + offset, 2:6] = 1.0
    return m


def test_summary_of_three_proposals():
    probabilities = torch.stack([_square(0), _square(0), _square(2)])
    s = summarise(probabilities)
    assert torch.equal(s.consensus, _square(0).bool())  # 2 of 3 agree
    assert torch.allclose(s.probability, probabilities.mean(0))
    assert s.std.max() > 0 and s.std[0, 0] == 0
    assert s.entropy[0, 0] < 1e-3 and s.entropy[6, 3] > 0.9  # voxel where 1 of 3 says yes
    assert s.pairwise_dice[0, 1] == 1.0 and abs(float(s.pairwise_dice[0, 2]) - 0.5) < 1e-6
    assert s.ranking == [0, 1, 2]
    assert abs(s.mean_pairwise_agreement - (1.0 + 0.5 + 0.5) / 3) < 1e-6


def test_single_proposal_agrees_with_itself():
    s = summarise(_square(0)[None])
    assert s.mean_pairwise_agreement == 1.0 and s.ranking == [0]


def test_dice_and_hd95():
    a, b = _square(0).bool(), _square(2).bool()
    assert dice(a, a) == 1.0 and abs(dice(a, b) - 0.5) < 1e-9
    assert dice(torch.zeros(3), torch.zeros(3)) == 1.0
    assert hd95(a.numpy(), a.numpy()) == 0.0
    assert abs(hd95(a.numpy(), b.numpy(), spacing=(3.0, 1.0)) - 6.0) < 1e-6


def test_proposals_that_bracket_the_reference_score_so_and_lie_closer_by_energy_distance():
    reference = torch.zeros(32, 32, dtype=torch.bool)
    reference[8:24, 8:24] = True
    tight, generous = torch.zeros_like(reference), torch.zeros_like(reference)
    tight[10:22, 10:22] = True
    generous[6:26, 6:26] = True
    around = torch.stack([tight, reference, generous])
    assert bracketing(around, reference) == {"inside_generous": 1.0, "tightest_inside": 1.0}
    off = torch.roll(around, shifts=12, dims=2)  # the same three answers, beside the organ
    assert bracketing(off, reference)["inside_generous"] < 0.5
    assert 0 <= generalized_energy_distance(around, reference) < generalized_energy_distance(off, reference)
