"""From N sampled proposals to what an expert looks at: consensus, uncertainty, agreement, ranking."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .metrics import dice

# A proposal's mask, and the consensus of N proposals, are where the (mean) probability reaches this.
MASK_THRESHOLD = 0.5


@dataclass
class ProposalSummary:
    """Statistics of N proposals of one organ (tensors over the spatial shape S)."""

    probability: torch.Tensor  # [*S] mean foreground probability over proposals
    consensus: torch.Tensor  # [*S] bool, probability >= MASK_THRESHOLD
    std: torch.Tensor  # [*S] per-voxel standard deviation over proposals
    entropy: torch.Tensor  # [*S] binary entropy (bits) of the mean probability
    pairwise_dice: torch.Tensor  # [N, N]
    dice_to_consensus: torch.Tensor  # [N]
    ranking: list[int]  # proposal indices, closest to the consensus first

    @property
    def mean_pairwise_agreement(self) -> float:
        """Mean Dice over distinct proposal pairs (1.0 for a single proposal)."""
        n = self.pairwise_dice.shape[0]
        if n < 2:
            return 1.0
        off_diagonal = self.pairwise_dice.sum() - self.pairwise_dice.diagonal().sum()
        return float(off_diagonal / (n * (n - 1)))


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-6, 1 - 1e-6)
    return -(p * torch.log2(p) + (1 - p) * torch.log2(1 - p))


def summarise(probabilities: torch.Tensor) -> ProposalSummary:
    """`probabilities` [N, *S] (one organ, N proposals) → `ProposalSummary`."""
    probabilities = probabilities.float()
    masks = probabilities >= MASK_THRESHOLD
    mean = probabilities.mean(dim=0)
    consensus = mean >= MASK_THRESHOLD
    n = probabilities.shape[0]
    pairwise = torch.ones(n, n)
    for i in range(n):
        for j in range(i + 1, n):
            pairwise[i, j] = pairwise[j, i] = dice(masks[i], masks[j])
    to_consensus = torch.tensor([dice(masks[k], consensus) for k in range(n)])
    ranking = sorted(range(n), key=lambda k: (-float(to_consensus[k]), k))
    return ProposalSummary(
        probability=mean,
        consensus=consensus,
        std=probabilities.std(dim=0, unbiased=False),
        entropy=binary_entropy(mean),
        pairwise_dice=pairwise,
        dice_to_consensus=to_consensus,
        ranking=ranking,
    )


def disagreement(probabilities: torch.Tensor) -> float:
    """How much N proposals [N, P, *S] of P organs disagree: 1 − mean pairwise Dice, averaged over the
    organs at least one proposal found.  0: they agree (or none found anything); 1: no two overlap.
    The active-learning score: an image the model is unsure about is worth an annotator's time."""
    agreements = []
    for p in range(probabilities.shape[1]):
        organ = probabilities[:, p].float()
        if (organ >= MASK_THRESHOLD).any():
            agreements.append(summarise(organ).mean_pairwise_agreement)
    return 1.0 - sum(agreements) / len(agreements) if agreements else 0.0
