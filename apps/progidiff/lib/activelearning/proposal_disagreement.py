"""MONAI Label strategy: offer the unlabelled image whose ProGiDiff proposals disagree the most.

Scores come from `POST /scoring/proposal_uncertainty` (stored in the image info); an unlabelled image
that has none yet is scored on the fly, with the scoring method's defaults unless the request says
otherwise (`organs`, `num_proposals`, `steps`, `slice_stride`, `seed`).
"""

from __future__ import annotations

import logging
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from lib.scoring.proposal_uncertainty import ScoringParams, score_images

logger = logging.getLogger(__name__)


class ProposalDisagreement(Strategy):
    def __init__(self, infer: Any):
        super().__init__("Unlabelled image on which the diffusion proposals disagree most")
        self.infer = infer

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any] | None:
        params = ScoringParams.from_request(request, self.infer)  # bad options: 400 even with nothing to score
        images = datastore.get_unlabeled_images()
        scores = score_images(self.infer, datastore, images, params, reuse_stored=True)
        if not scores:
            return None
        chosen = max(scores, key=lambda i: (scores[i]["score"], i))
        logger.info("proposal_disagreement: %s (score %.4f of %d unlabelled)", chosen, scores[chosen]["score"], len(scores))
        return {"id": chosen, "score": scores[chosen]["score"],
                "score_from_current_model": scores[chosen].get("model_version") == self.infer.model_version()}
