"""Boxes, rotated regions and affine maps between source pixels and model crops.

Coordinates are source pixels, ``x`` to the right and ``y`` down, floats. A box is
``(x0, y0, x1, y1)``. A :class:`Roi` is a square region turned by ``rotation_rad`` (positive turns
the image content clockwise on screen, as mediapipe's ``NormRect.rotation``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Box = tuple[float, float, float, float]
Points = npt.NDArray[np.float32]
"""Points ``(n, 2)`` in source pixels."""
Affine = npt.NDArray[np.float64]
"""A 2×3 affine matrix mapping source pixels to crop pixels (``cv2.warpAffine`` convention)."""


@dataclass(frozen=True, slots=True)
class Roi:
    """A rotated square region of a frame: centre, side and rotation."""

    cx: float
    cy: float
    size: float
    rotation_rad: float = 0.0

    def to_crop(self, side_px: int) -> Affine:
        """The affine map from source pixels to a ``side_px`` × ``side_px`` crop of this region."""
        return similarity(
            (self.cx, self.cy), self.rotation_rad, side_px / self.size, (side_px / 2, side_px / 2)
        )


def similarity(
    centre: tuple[float, float], rotation_rad: float, scale: float, target: tuple[float, float]
) -> Affine:
    """A map turning by ``-rotation_rad`` about ``centre``, scaling, moving it to ``target``."""
    cos, sin = math.cos(rotation_rad) * scale, math.sin(rotation_rad) * scale
    cx, cy = centre
    tx, ty = target
    return np.array(
        [[cos, sin, tx - cos * cx - sin * cy], [-sin, cos, ty + sin * cx - cos * cy]],
        dtype=np.float64,
    )


def fit_similarity(source: npt.NDArray[np.floating], target: npt.NDArray[np.floating]) -> Affine:
    """The least-squares similarity (turn, uniform scale, shift) taking ``source`` onto ``target``.

    Umeyama's closed form (1991), the fit InsightFace and OpenCV's ``FaceRecognizerSF`` use to
    align five face landmarks onto the ArcFace template; both arrays are ``(n, 2)``.
    """
    src = np.asarray(source, dtype=np.float64)
    dst = np.asarray(target, dtype=np.float64)
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    u, singular, vt = np.linalg.svd(dst_c.T @ src_c / len(src))
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1] = -1.0
    rotation = u @ np.diag(sign) @ vt
    variance = float((src_c**2).sum() / len(src))
    scale = float((singular * sign).sum() / variance) if variance > 0 else 1.0
    shift = dst_mean - scale * rotation @ src_mean
    return np.hstack([scale * rotation, shift[:, None]])


def invert(matrix: Affine) -> Affine:
    """The inverse of a 2×3 affine map."""
    full = np.vstack([matrix, [0.0, 0.0, 1.0]])
    return np.linalg.inv(full)[:2]


def apply(matrix: Affine, points: npt.NDArray[np.floating]) -> Points:
    """Map points ``(n, 2)`` through a 2×3 affine matrix."""
    pts = np.asarray(points, dtype=np.float64)
    return (pts @ matrix[:, :2].T + matrix[:, 2]).astype(np.float32)


def angle_of(start: npt.NDArray[np.floating], end: npt.NDArray[np.floating]) -> float:
    """The rotation that makes the line ``start → end`` horizontal, in [-π, π) (mediapipe's)."""
    raw = -math.atan2(-(float(end[1]) - float(start[1])), float(end[0]) - float(start[0]))
    return normalize_radians(raw)


def normalize_radians(angle: float) -> float:
    """An angle wrapped into [-π, π)."""
    return angle - 2 * math.pi * math.floor((angle + math.pi) / (2 * math.pi))


def bounds(points: npt.NDArray[np.floating]) -> Box:
    """The axis-aligned box around points ``(n, 2)``."""
    x0, y0 = np.min(points[:, :2], axis=0)
    x1, y1 = np.max(points[:, :2], axis=0)
    return float(x0), float(y0), float(x1), float(y1)


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes (0 when either is empty)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0


def area(box: Box) -> float:
    """Area of a box (0 for an inverted one)."""
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def roi_around(box: Box, rotation_rad: float, scale: float) -> Roi:
    """A square region on the box centre, its side ``scale`` × the box's longer side.

    As mediapipe's ``RectTransformationCalculator`` with ``square_long``: the side is taken from the
    longer edge of the box before the rotation is applied.
    """
    width, height = box[2] - box[0], box[3] - box[1]
    return Roi(
        cx=(box[0] + box[2]) / 2,
        cy=(box[1] + box[3]) / 2,
        size=max(width, height) * scale,
        rotation_rad=rotation_rad,
    )
