"""A PNG montage for people to look at: image, reference, consensus, each proposal, uncertainty."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .proposals import MASK_THRESHOLD  # noqa: E402


def pick_slices(mask: np.ndarray, count: int = 3) -> list[int]:
    """Slices through the organ (spread over its extent), or the middle ones when it is absent."""
    z = np.flatnonzero(mask.reshape(-1, mask.shape[-1]).any(axis=0))
    if z.size == 0:
        z = np.arange(mask.shape[-1])
    return sorted({int(z[int(i)]) for i in np.linspace(0, z.size - 1, count + 2)[1:-1]})


def save_montage(
    path: str | Path,
    image: np.ndarray,
    proposals: np.ndarray,
    uncertainty: np.ndarray,
    reference: np.ndarray | None = None,
    title: str = "",
    window: tuple[float, float] = (-160.0, 240.0),
) -> Path:
    """`image` [X,Y,Z]; `proposals` [N,X,Y,Z] probabilities; `uncertainty` [X,Y,Z]; `reference` bool [X,Y,Z]."""
    consensus = proposals.mean(axis=0) >= MASK_THRESHOLD
    slices = pick_slices(reference if reference is not None and reference.any() else consensus)
    columns = [("image", None), ("reference", reference), ("consensus", consensus)]
    columns += [(f"proposal {k}", proposals[k] >= MASK_THRESHOLD) for k in range(proposals.shape[0])]
    columns = [c for c in columns if c[0] != "reference" or reference is not None]
    fig, axes = plt.subplots(len(slices), len(columns) + 1, figsize=(2.2 * (len(columns) + 1), 2.3 * len(slices)),
                             squeeze=False)
    low, high = window if image.min() < -500 else np.percentile(image, [1, 99])
    for row, z in enumerate(slices):
        for col, (name, mask) in enumerate(columns):
            ax = axes[row, col]
            ax.imshow(image[:, :, z].T, cmap="gray", vmin=low, vmax=high, origin="lower")
            if mask is not None:
                ax.contour(mask[:, :, z].T.astype(float), levels=[0.5], colors="lime" if name != "reference" else "red",
                           linewidths=0.8)
            ax.set_title(f"{name} z={z}" if col == 0 else name, fontsize=8)
            ax.axis("off")
        ax = axes[row, -1]
        ax.imshow(uncertainty[:, :, z].T, cmap="magma", vmin=0, vmax=0.5, origin="lower")
        ax.set_title("uncertainty (std)", fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
