"""One label schema by organ name, shared by CT and MR, and loaders into it.

TotalSegmentator's CT and MR label maps give the same organ different ids (aorta is 52 in
"total", 23 in "total_mr"), so everything here maps by *name*, through a class map
(`{"total": {"1": "spleen", ...}, "total_mr": {...}}` or a flat `{"1": "spleen", ...}`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .prompts import KNOWN_ORGANS, UnknownPromptError, resolve_organ

# The project's schema: organ name → label value (0 is background).
ORGAN_IDS: dict[str, int] = {organ: i + 1 for i, organ in enumerate(KNOWN_ORGANS)}


# A proposal shown as a segment of its own: "liver - proposal 2 of 5" (ASCII: .seg.nrrd headers are ASCII).
PROPOSAL_SEGMENT = " - proposal "


def proposal_segment_name(organ: str, k: int, n: int) -> str:
    """The segment name of proposal k (0-based) of n, counted 1-based for people; tightest first."""
    return f"{organ}{PROPOSAL_SEGMENT}{k + 1} of {n}"


def schema_organ(source_name: str) -> str | None:
    """A source label name → the schema organ it belongs to, or None when the schema has no such organ.
    A picked proposal saved as it came ("liver - proposal 2 of 5") is that organ."""
    source_name = source_name.split(PROPOSAL_SEGMENT)[0]
    if source_name.startswith("vertebrae"):  # TotalSegmentator's CT map labels each vertebra
        return "vertebrae"
    if source_name in ORGAN_IDS:
        return source_name
    try:  # a viewer's segment name: "Liver", "left kidney", "IVC"
        return resolve_organ(source_name)
    except UnknownPromptError:
        return None


def find_class_map(start: Path) -> Path | None:
    """The nearest `class_map.json` in `start`'s folder or above (TotalSegmentator data keeps one at its root)."""
    for folder in [start if start.is_dir() else start.parent, *start.resolve().parents]:
        candidate = folder / "class_map.json"
        if candidate.is_file():
            return candidate
    return None


def load_class_map(label_map: str, label_path: Path | None = None) -> dict[int, str]:
    """`label_map` is "total", "total_mr" (looked up in the nearest class_map.json) or a JSON file path."""
    if label_map.endswith(".json"):
        data = json.loads(Path(label_map).read_text())
        if all(isinstance(v, dict) for v in data.values()) and len(data) == 1:
            data = next(iter(data.values()))
        return {int(k): str(v) for k, v in data.items()}
    class_map_file = find_class_map(label_path) if label_path is not None else None
    if class_map_file is None:
        raise FileNotFoundError(
            f"No class_map.json found near {label_path} for label map {label_map!r}; pass a JSON file instead"
        )
    data = json.loads(class_map_file.read_text())
    if label_map not in data:
        raise KeyError(f"{class_map_file} has no {label_map!r} map; it has: {', '.join(data)}")
    return {int(k): str(v) for k, v in data[label_map].items()}


def class_map_from_label_info(info: dict) -> dict[int, str] | None:
    """The id → name map a viewer saved with a label, or None when the label is already in the schema.

    3D Slicer's MONAI Label module sends `label_info` as [{"name": "liver", "idx": 1}, ...]; the app's own
    outputs carry `label_names` as {"liver": 1, ...}.
    """
    if isinstance(info.get("label_names"), dict):
        return {int(v): str(k) for k, v in info["label_names"].items()}
    if isinstance(info.get("label_info"), list):
        entries = [e for e in info["label_info"] if isinstance(e, dict) and "name" in e and "idx" in e]
        return {int(e["idx"]): str(e["name"]) for e in entries} or None
    return None


def to_schema(label: np.ndarray, class_map: dict[int, str]) -> np.ndarray:
    """Relabel a source label map into the schema's ids (unknown organs become background)."""
    lookup = np.zeros(max(max(class_map, default=0), int(label.max(initial=0))) + 1, dtype=np.uint8)
    for source_id, name in class_map.items():
        organ = schema_organ(name)
        if organ is not None:
            lookup[source_id] = ORGAN_IDS[organ]
    return lookup[np.clip(label.astype(np.int64), 0, len(lookup) - 1)]


def organs_present(label: np.ndarray, min_voxels: int = 1) -> list[str]:
    """Schema organs with at least `min_voxels` voxels in a schema label map, in schema order."""
    counts = np.bincount(label.ravel().astype(np.int64), minlength=len(ORGAN_IDS) + 1)
    return [organ for organ, value in ORGAN_IDS.items() if counts[value] >= min_voxels]
