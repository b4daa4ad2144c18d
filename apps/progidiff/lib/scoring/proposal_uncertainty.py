"""MONAI Label scoring method: how much ProGiDiff's proposals disagree on each unlabelled image.

`POST /scoring/proposal_uncertainty` samples N proposals of a few organs on every `slice_stride`-th
slice of each unlabelled image and stores, in the image's datastore info under
`proposal_uncertainty`, the score `1 − mean pairwise Dice of the proposals, averaged over the organs
they found` (`progidiff.proposals.disagreement`) with how it was computed.  The
`proposal_disagreement` strategy then offers the highest-scoring image for annotation.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod

from lib.infers.params import MAX_PROMPT_CHARS, MAX_STEPS, bad_request, integer_param
from progidiff.predict import load_volume
from progidiff.prompts import UnknownPromptError, parse_prompt
from progidiff.proposals import disagreement

logger = logging.getLogger(__name__)

SCORE_KEY = "proposal_uncertainty"
MAX_SLICE_STRIDE = 100


@dataclass
class ScoringParams:
    organs: str = "liver,spleen,kidney_left,kidney_right"
    num_proposals: int = 3
    steps: int = 5
    slice_stride: int = 4
    seed: int = 0

    @classmethod
    def from_request(cls, request: dict[str, Any], infer: Any) -> "ScoringParams":
        """Checked and bounded as an infer request is (HTTP 400 saying what is accepted), before any work.
        Proposals: 2 (disagreement needs two) to the server's `max_proposals`."""
        defaults = cls()
        known = infer.known_organs()
        # By default the model's own organs among liver, spleen and kidneys; organs a request names must be known.
        default_organs = ",".join([o for o in defaults.organs.split(",") if o in known] or list(known))
        organs = request.get("organs", default_organs)
        if not isinstance(organs, str) or len(organs) > MAX_PROMPT_CHARS:
            raise bad_request(f"'organs' must be a prompt of at most {MAX_PROMPT_CHARS} characters, e.g. "
                              f"{defaults.organs!r}; got {organs!r}"[:600])
        try:
            parse_prompt(organs, known=known)
        except UnknownPromptError as error:
            raise bad_request(str(error)) from None
        return cls(
            organs=organs,
            num_proposals=integer_param(request, "num_proposals", defaults.num_proposals, 2, infer.settings.max_proposals),
            steps=integer_param(request, "steps", defaults.steps, 1, MAX_STEPS),
            slice_stride=integer_param(request, "slice_stride", defaults.slice_stride, 1, MAX_SLICE_STRIDE),
            seed=integer_param(request, "seed", defaults.seed, 0, 2**31 - 1),
        )


def score_image(infer: Any, datastore: Datastore, image_id: str, params: ScoringParams) -> dict[str, Any]:
    """Sample proposals for one datastore image and store its disagreement score in the image info."""
    served = infer.served()  # one model version for the whole score
    organs = parse_prompt(params.organs, known=served.known_organs())
    path = datastore.get_image_uri(image_id)
    volume = load_volume(path, served.pipeline.model.config.spacing_mm).image[0]
    (modality, _), adapter = infer.choose_adapter(served, "auto", path, volume.numpy())  # as an infer of it would
    sampled = volume[:, :, :: params.slice_stride].as_tensor()
    proposals = infer.sample(served, sampled, organs, params.num_proposals, params.steps, params.seed, adapter)
    entry = {
        "score": round(disagreement(proposals.probabilities), 6),
        "modality": modality,
        "adapter": adapter,
        "organs": organs,
        "num_proposals": params.num_proposals,
        "steps": params.steps,
        "slice_stride": params.slice_stride,
        "model_version": served.version,
        "ts": int(time.time()),
    }
    datastore.update_image_info(image_id, {SCORE_KEY: entry})
    logger.info("%s: %s score %.4f (%.1f s)", image_id, SCORE_KEY, entry["score"], proposals.seconds)
    return entry


def score_images(infer: Any, datastore: Datastore, images: list[str], params: ScoringParams,
                 reuse_stored: bool = False) -> dict[str, dict[str, Any]]:
    """Score entries of `images` (with `reuse_stored`, a readable stored score is kept). A study that cannot be
    read or scored is left out with a warning: one broken study must not stop the others, nor the strategy."""
    scores = {}
    for image_id in images:
        entry = datastore.get_image_info(image_id).get(SCORE_KEY) if reuse_stored else None
        if not (isinstance(entry, dict) and isinstance(entry.get("score"), (int, float))):
            try:
                entry = score_image(infer, datastore, image_id, params)
            except Exception as error:  # noqa: BLE001 - whatever is wrong with this study, the others go on
                logger.warning("%s cannot be scored and is left out: %s: %s", image_id, type(error).__name__, error)
                continue
        scores[image_id] = entry
    return scores


class ProposalUncertainty(ScoringMethod):
    def __init__(self, infer: Any):
        super().__init__("Disagreement of ProGiDiff's proposals (1 − mean pairwise Dice) on unlabelled images")
        self.infer = infer

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        params = ScoringParams.from_request(request, self.infer)
        images = datastore.get_unlabeled_images()
        logger.info("scoring %d unlabelled images with %s", len(images), params)
        return {image_id: entry["score"] for image_id, entry in score_images(self.infer, datastore, images, params).items()}
