"""How the real clients read a segmentation result, replayed exactly (MONAI Label 0.8.5's plugins).

- 3D Slicer's module (`plugins/slicer/MONAILabel/MONAILabel.py`): `onClickSegmentation` takes `label_names`
  from the JSON result (else the model's `labels`), sorts a dict by value into a list, and
  `updateSegmentationMask` imports the label map so that the i-th name's segment gets the voxels of value
  i+1 (`ImportLabelmapToSegmentationNode` with segment ids). A `.seg.nrrd` reply is loaded as a whole
  segmentation (one segment per layer, names from the file), when the module's file extension is `.seg.nrrd`.
- OHIF's panel (`plugins/ohifv3/.../MonaiLabelPanel.tsx`, `ClassPrompts.tsx`, `AutoSegmentation.tsx`):
  asks with `output=image`, maps the returned values through the model's labels in `/info`
  (`modelLabelToIdxMap`), for the ticked labels (Class Prompts) or every model label (Auto-Segmentation).
"""

from __future__ import annotations

import json

import nrrd
import numpy as np
import requests
import SimpleITK as sitk

# What each client adds to every infer request.
SLICER_INFER_PARAMS = {"result_extension": ".nrrd", "result_dtype": "uint8"}
OHIF_INFER_PARAMS = {"result_extension": ".nrrd", "result_dtype": "uint8", "result_compress": False,
                     "restore_label_idx": False}


def on_reference_grid(path: str, reference: sitk.Image) -> np.ndarray:
    """A returned label file resampled (nearest) onto the reference label's grid, as an array [z, y, x]."""
    image = sitk.ReadImage(path)
    return sitk.GetArrayFromImage(sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0))


def slicer_segments(result_file: str, result: dict, model_info: dict, reference: sitk.Image) -> dict[str, np.ndarray]:
    """Segment name → mask, as Slicer's module imports a label map."""
    labels = result.get("label_names") or model_info.get("labels")
    if isinstance(labels, dict):
        labels = [k for k, _ in sorted(labels.items(), key=lambda item: item[1])]
    labels = [label for label in labels if label != "background"]
    data = on_reference_grid(result_file, reference)
    return {name: data == i + 1 for i, name in enumerate(labels)}


def slicer_seg_nrrd_segments(result_file: str) -> dict[str, np.ndarray]:
    """Segment name → mask of a `.seg.nrrd` (one segment per layer of the 4D list axis, as MONAI Label writes)."""
    data, header = nrrd.read(result_file)
    names = [header[f"Segment{i}_Name"] for i in range(data.shape[0])]
    return {name: data[i] > 0 for i, name in enumerate(names)}


def ohif_model_labels(info: dict, model: str) -> dict[str, int]:
    """`modelLabelToIdxMap[model]` of OHIF's panel (a list counts from 1, a dict keeps its values)."""
    labels = info["models"][model]["labels"]
    if isinstance(labels, list):
        return {label: i for i, label in enumerate(labels, start=1)}
    return dict(labels)


def ohif_infer(url: str, model: str, image: str, params: dict) -> requests.Response:
    """OHIF's `MonaiLabelClient.infer`: output=image, the options as the multipart field `params`."""
    return requests.post(f"{url}/infer/{model}", params={"image": image, "output": "image"},
                         files={"params": (None, json.dumps({**params, **OHIF_INFER_PARAMS}))}, timeout=600)


def ohif_segments(content: bytes, tmp_path, info: dict, model: str, ticked: list[str],
                  reference: sitk.Image) -> dict[str, np.ndarray]:
    """Segment name → mask, as OHIF's `updateView` maps the values of the returned NRRD."""
    path = tmp_path / "ohif_result.nrrd"
    path.write_bytes(content)
    data = on_reference_grid(str(path), reference)
    index = ohif_model_labels(info, model)
    return {name: data == index[name] for name in ticked}
