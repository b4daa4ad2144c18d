"""What the unseen-patient benches score, defined once: the team's real CT beside the checkout, its block that
no committed model was trained on, and the organs the unseen-patient issue (#20) scores.

The block is `ct_a` z 10-17, which is `ct_a_full` z 92-99: the recipe's `--hold-out 92:100` (model/README.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from progidiff.data import load_volume_pair

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CT_A = SHARED_DATA / "ct_a"
HELD_OUT = slice(10, 18)  # ct_a slices kept out of the default model's training
HELD_OUT_SLICES = f"{HELD_OUT.start}:{HELD_OUT.stop}"  # as `progidiff.evaluate --slices` reads it
HELD_OUT_Z = f"z {HELD_OUT.start}-{HELD_OUT.stop - 1}"  # as the case names print it
CT_A_FULL = SHARED_DATA / "ct_a_full"  # the same patient at its full z extent; ct_a is its slices 82-111
HELD_OUT_FULL = slice(HELD_OUT.start + 82, HELD_OUT.stop + 82)  # the block in ct_a_full: the recipe's --hold-out 92:100
MR_A = SHARED_DATA / "mr_a"  # the labelled MR: another patient, rendered as CT in the recipe's stage 2
MR_A_HELD_OUT = "5:10,15:20"  # its slices never trained on: the recipe's --pseudo-ct-hold-out, the adapter's
UNSEEN_ORGANS = ["liver", "spleen", "kidney_left", "kidney_right", "stomach", "pancreas", "aorta", "inferior_vena_cava"]


def held_out_block(spacing: float = 3.0) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """The held-out block resampled in-plane to `spacing`: (image [X, Y, Z] in HU, schema label, voxel spacing)."""
    volume = load_volume_pair(CT_A / "image.nii.gz", CT_A / "label.nii.gz", "total", spacing=spacing)
    return volume.image[:, :, HELD_OUT], volume.label[:, :, HELD_OUT], volume.spacing
