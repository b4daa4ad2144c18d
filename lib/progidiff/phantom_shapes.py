"""Geometry for the phantom generator: a voxel grid seen in anatomy coordinates, and soft shapes painted on it.

Anatomy is written in canonical body coordinates (mm; x → patient's right, y → anterior, z → superior, the
origin mid-abdomen), so that organ templates read like an anatomy atlas.  `Canvas` maps its voxels to those
coordinates through the patient's pose (size, rotation, shift) and a smooth random warp, so every template is
deformed per patient.  Shapes are signed distances in mm (negative inside), turned into partial-volume
occupancy over about one voxel; each shape is evaluated only on the box of voxels that can hold it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from scipy.special import expit

Box = tuple[slice, slice, slice]


def smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma: float | Sequence[float]) -> np.ndarray:
    """Gaussian-filtered white noise with unit standard deviation (float32)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return field / (field.std() + 1e-8)


def rotation(yaw: float = 0.0, pitch: float = 0.0, roll: float = 0.0) -> np.ndarray:
    """3×3 rotation (radians) about z (in-plane), then y, then x."""
    cz, sz = np.cos(yaw), np.sin(yaw)
    cy, sy = np.cos(pitch), np.sin(pitch)
    cx, sx = np.cos(roll), np.sin(roll)
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    return rz @ ry @ rx


def ellipsoid(p: tuple[np.ndarray, ...], centre: Sequence[float], radii: Sequence[float],
              rot: np.ndarray | None = None) -> np.ndarray:
    """Signed distance (mm, first-order) to an ellipsoid; `rot` turns the ellipsoid's axes into the body's."""
    d = [p[i] - centre[i] for i in range(3)]
    if rot is not None:  # coordinates in the ellipsoid's own axes: rot.T @ d
        d = [rot[0, i] * d[0] + rot[1, i] * d[1] + rot[2, i] * d[2] for i in range(3)]
    q = [d[i] / radii[i] for i in range(3)]
    norm = np.sqrt(q[0] ** 2 + q[1] ** 2 + q[2] ** 2) + 1e-6
    gradient = np.sqrt((q[0] / radii[0]) ** 2 + (q[1] / radii[1]) ** 2 + (q[2] / radii[2]) ** 2) / norm + 1e-6
    return ((norm - 1.0) / gradient).astype(np.float32)


def tube(p: tuple[np.ndarray, ...], points: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Signed distance (mm) to a tube along a polyline `points` [n, 3] with a radius per point [n]."""
    best = np.full(p[0].shape, np.inf, dtype=np.float32)
    for a, b, ra, rb in zip(points[:-1], points[1:], radii[:-1], radii[1:]):
        ab = b - a
        length2 = float(ab @ ab) + 1e-6
        t = np.clip(((p[0] - a[0]) * ab[0] + (p[1] - a[1]) * ab[1] + (p[2] - a[2]) * ab[2]) / length2, 0.0, 1.0)
        dist = np.sqrt((p[0] - a[0] - t * ab[0]) ** 2 + (p[1] - a[1] - t * ab[1]) ** 2 + (p[2] - a[2] - t * ab[2]) ** 2)
        np.minimum(best, dist - (ra + (rb - ra) * t), out=best)
    return best


def vertical_tube(p: tuple[np.ndarray, ...], z_knots: Sequence[float], x_knots: Sequence[float],
                  y_knots: Sequence[float], rx_knots: Sequence[float], ry_knots: Sequence[float]) -> np.ndarray:
    """Signed distance (mm, in-plane) to a tube running mostly along z with an elliptic cross-section,
    its centre and radii interpolated between knots (aorta, IVC, psoas): cheaper than `tube` and flattened."""
    order = np.argsort(z_knots)
    z_knots, x_knots, y_knots, rx_knots, ry_knots = (np.asarray(k, dtype=np.float32)[order] for k in
                                                    (z_knots, x_knots, y_knots, rx_knots, ry_knots))
    z = p[2]
    xc, yc = np.interp(z, z_knots, x_knots), np.interp(z, z_knots, y_knots)
    rx, ry = np.interp(z, z_knots, rx_knots), np.interp(z, z_knots, ry_knots)
    q = np.sqrt(((p[0] - xc) / rx) ** 2 + ((p[1] - yc) / ry) ** 2) + 1e-6
    inside_z = (z >= z_knots[0]) & (z <= z_knots[-1])
    sd = (q - 1.0) * np.minimum(rx, ry)
    return np.where(inside_z, sd, np.float32(1e3)).astype(np.float32)


def smooth_union(a: np.ndarray, b: np.ndarray, k: float = 8.0) -> np.ndarray:
    """Union of two signed distances with a fillet of about `k` mm where they meet (polynomial smooth min)."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return (b * (1 - h) + a * h - k * h * (1 - h)).astype(np.float32)


class Canvas:
    """The phantom's voxels, their anatomy coordinates, and the images and label being painted on them.

    `scale`, `angle` (radians, in-plane) and `shift` (mm) place the patient in the scanner; `warp` (three
    fields of the grid's shape, mm) deforms the anatomy templates.  Channels: `ct` (HU), `mr` (signal),
    `texture` (per-voxel amplitude of the tissue texture added at the end) and `label` (schema values).
    """

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float], z_origin: float,
                 scale: np.ndarray, angle: float, shift: np.ndarray, warp: list[np.ndarray]):
        self.shape, self.spacing = shape, spacing
        xs = (np.arange(shape[0]) - (shape[0] - 1) / 2) * spacing[0]
        ys = (np.arange(shape[1]) - (shape[1] - 1) / 2) * spacing[1]
        zs = np.arange(shape[2]) * spacing[2] + z_origin
        X, Y, Z = np.meshgrid(xs.astype(np.float32), ys.astype(np.float32), zs.astype(np.float32), indexing="ij")
        cos, sin = np.cos(angle), np.sin(angle)
        self.cx = (cos * (X - shift[0]) + sin * (Y - shift[1])) / scale[0] + warp[0]
        self.cy = (-sin * (X - shift[0]) + cos * (Y - shift[1])) / scale[1] + warp[1]
        self.cz = Z / scale[2] + warp[2]
        self.world_y = Y  # gravity points to −y (supine): fluid levels are horizontal in the scanner
        self.voxel = float(spacing[0] / scale[:2].mean())  # one in-plane voxel in anatomy mm
        step = (4, 4, max(1, int(round(6.0 / spacing[2]))))
        self._coarse = step, (self.cx[::step[0], ::step[1], ::step[2]], self.cy[::step[0], ::step[1], ::step[2]],
                              self.cz[::step[0], ::step[1], ::step[2]])
        self.ct = np.full(shape, -1000.0, dtype=np.float32)
        self.mr = np.zeros(shape, dtype=np.float32)
        self.texture = np.zeros(shape, dtype=np.float32)
        self.label = np.zeros(shape, dtype=np.uint8)

    def box(self, low: Sequence[float], high: Sequence[float], pad: float = 6.0) -> Box | None:
        """Index box of the voxels whose anatomy coordinates lie within [low − pad, high + pad] (None: none)."""
        step, (cx, cy, cz) = self._coarse
        inside = ((cx >= low[0] - pad) & (cx <= high[0] + pad) & (cy >= low[1] - pad) & (cy <= high[1] + pad)
                  & (cz >= low[2] - pad) & (cz <= high[2] + pad))
        if not inside.any():
            return None
        box = []
        for axis in range(3):
            hit = np.flatnonzero(inside.any(axis=tuple(a for a in range(3) if a != axis)))
            box.append(slice(max(0, (hit[0] - 1) * step[axis]), min(self.shape[axis], (hit[-1] + 2) * step[axis])))
        return tuple(box)

    def full(self) -> Box:
        return (slice(None), slice(None), slice(None))

    def coords(self, box: Box) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.cx[box], self.cy[box], self.cz[box]

    def occupancy(self, signed_distance: np.ndarray) -> np.ndarray:
        """Partial volume: the share of a voxel inside the shape, ramping over about one voxel."""
        return expit(-4.0 * signed_distance / self.voxel).astype(np.float32)

    def paint(self, box: Box, occupancy: np.ndarray, ct: float | np.ndarray, mr: float | np.ndarray,
              label: int | None = None, texture: float = 0.0, keep_label: bool = False) -> None:
        """Composite a tissue over what is there.  `label`: its schema value where the voxel is mostly it;
        None clears the label there (an unlabelled tissue in front), unless `keep_label` (a vessel inside
        the liver is still liver)."""
        rest = 1.0 - occupancy
        self.ct[box] = self.ct[box] * rest + ct * occupancy
        self.mr[box] = self.mr[box] * rest + mr * occupancy
        self.texture[box] = self.texture[box] * rest + texture * occupancy
        if label is not None or not keep_label:
            region = self.label[box]
            region[occupancy >= 0.5] = label or 0
