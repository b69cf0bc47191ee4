"""Per-frame crops of a face track, from smoothed geometry.

Four crops per track and frame, all cut from the source picture by one affine warp each:

- ``face``: the SyncNet v2 face crop, as joonson/syncnet_python's ``crop_video`` cuts it: the box
  centre and half-size ``s`` (half the longer side) smoothed by a median over time, the region
  ``x ∈ [cx - s(1+c), cx + s(1+c)]``, ``y ∈ [cy - s, cy + s(1+2c)]`` with crop scale ``c = 0.4``
  (the face sits in the upper middle, the chin is well inside), resized to 224×224 RGB; outside
  the picture the pad value is 110, as there.
- ``face112``: the Light-ASD / TalkNet input, the centre 112×112 of the grey ``face`` crop
  (their demo converts the 224×224 crop to grey and keeps ``[56:168, 56:168]``).
- ``mouth``: our compact sync model's input, grey, ``mouth_height`` × ``mouth_width`` (48×96),
  turned so that the eye line is level, centred on the lips, scaled by the distance between the
  eyes (which, unlike the mouth, does not change size while speaking); all three smoothed.
- ``aligned``: the face identity crop, 112×112 RGB, aligned by the least-squares similarity of
  five mesh points (eye centres, nose tip, mouth corners) onto the ArcFace template, as SFace and
  every ArcFace-style face embedding expect; cut from this frame's points (unsmoothed: a fixed
  template already removes pose, smoothing would blur the fit).
- ``lips``: the 40 lip points of the mesh, this frame's (unsmoothed: their motion is the signal),
  in the stabilised face frame: origin at the smoothed lip centre, x along the eye line, one unit =
  the smoothed eye distance.

Smoothing is a centred median over ``2 * lag + 1`` frames, so a crop is ready ``lag`` frames after
its picture arrived: a bounded look-ahead (default 3 frames = 120 ms at 25 fps) that live streams
can afford; syncnet_python's offline median of 13 frames is ``lag = 6``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from engine.vision.geometry import Box, angle_of, apply, fit_similarity, similarity

LIP_POINTS = (
    61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 185, 40, 39, 37, 0, 267, 269, 270, 409,
    78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308, 191, 80, 81, 82, 13, 312, 311, 310, 415,
)  # fmt: skip
"""The 40 mesh points of mediapipe's ``FACEMESH_LIPS``: outer lower lip corner to corner (11),
outer upper lip between the corners (9), then the inner line the same way (11 + 9)."""
RIGHT_EYE = (33, 133)
LEFT_EYE = (362, 263)
"""Eye corners of the mesh; the eye centre is their midpoint."""
NOSE_TIP = 4
MOUTH_CORNERS = (61, 291)
"""Mesh points of the nose tip and of the mouth corners (image left, then right)."""
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ]
)
"""Where the five identity landmarks sit in a 112×112 ArcFace crop: the eye in the image's
left, the other eye, the nose tip, the mouth corners left then right."""
ALIGNED_SIDE = 112


SYNC_SMOOTH_LAG_FRAMES = 6
"""The box smoothing the sync model was trained on: syncnet_python's 13-frame median, a
look-ahead of 6 frames. Offline features and the live engine both use it: with a shorter live
look-ahead the crops jitter more and the live lip embeddings drift from the trained ones (on
the two-face scene, 2 frames picked the right face on 70% of 1 s windows against 83%)."""


@dataclass(frozen=True)
class CropConfig:
    """Sizes and smoothing of the crops.

    Attributes:
        smooth_lag_frames: look-ahead of the median smoothing, frames (window ``2 * lag + 1``).
        face_side: side of the SyncNet face crop, pixels.
        crop_scale: syncnet_python's ``crop_scale`` (margin around the box).
        pad_value: grey level outside the picture (syncnet_python pads with 110).
        mouth_height: mouth crop height, pixels.
        mouth_width: mouth crop width, pixels.
        mouth_span_eyes: width of the mouth crop in eye distances (a mouth is about 0.9).
    """

    smooth_lag_frames: int = 3
    face_side: int = 224
    crop_scale: float = 0.4
    pad_value: int = 110
    mouth_height: int = 48
    mouth_width: int = 96
    mouth_span_eyes: float = 1.8


@dataclass(frozen=True, slots=True)
class FaceGeometry:
    """What the crops need from one frame's landmarks (source pixels, radians)."""

    cx: float
    cy: float
    half: float
    angle: float
    eyes: float
    mouth_x: float
    mouth_y: float

    def as_array(self) -> npt.NDArray[np.float64]:
        """The seven numbers, for the median."""
        return np.array(
            [self.cx, self.cy, self.half, self.angle, self.eyes, self.mouth_x, self.mouth_y]
        )

    @classmethod
    def from_array(cls, values: npt.NDArray[np.float64]) -> FaceGeometry:
        """The inverse of :meth:`as_array`."""
        return cls(*(float(v) for v in values))

    @property
    def box(self) -> Box:
        """The square face box this geometry stands for."""
        return (self.cx - self.half, self.cy - self.half, self.cx + self.half, self.cy + self.half)


def geometry_of(points: npt.NDArray[np.float32], box: Box) -> FaceGeometry:
    """The crop geometry of one frame from its mesh points ``(468, 2)`` and their box."""
    right = points[list(RIGHT_EYE)].mean(axis=0)
    left = points[list(LEFT_EYE)].mean(axis=0)
    lips = points[list(LIP_POINTS)].mean(axis=0)
    return FaceGeometry(
        cx=(box[0] + box[2]) / 2,
        cy=(box[1] + box[3]) / 2,
        half=max(box[2] - box[0], box[3] - box[1]) / 2,
        angle=angle_of(right, left),
        eyes=max(1.0, float(np.hypot(*(left - right)))),
        mouth_x=float(lips[0]),
        mouth_y=float(lips[1]),
    )


def smooth(window: list[FaceGeometry]) -> FaceGeometry:
    """The per-field median of the geometries in a window."""
    return FaceGeometry.from_array(np.median(np.stack([g.as_array() for g in window]), axis=0))


@dataclass(frozen=True, slots=True)
class Crops:
    """The crops of one face in one frame (shapes in the module docstring)."""

    face: npt.NDArray[np.uint8]
    face112: npt.NDArray[np.uint8]
    mouth: npt.NDArray[np.uint8]
    aligned: npt.NDArray[np.uint8]
    lips: npt.NDArray[np.float32]
    box: Box


def cut(
    rgb: npt.NDArray[np.uint8],
    geometry: FaceGeometry,
    lip_points: npt.NDArray[np.float32],
    config: CropConfig,
    align_points: npt.NDArray[np.float32],
) -> Crops:
    """Cut every crop of one face from one picture.

    Args:
        rgb: the source picture ``(height, width, 3)``.
        geometry: the smoothed geometry for this frame.
        lip_points: this frame's 40 lip points ``(40, 2)``, source pixels.
        config: crop sizes.
        align_points: this frame's five identity landmarks ``(5, 2)``, see
            :func:`align_points_of`.
    """
    face = _face_crop(rgb, geometry, config)
    grey = np.asarray(cv2.cvtColor(face, cv2.COLOR_RGB2GRAY), dtype=np.uint8)
    quarter = config.face_side // 4
    face112 = np.ascontiguousarray(grey[quarter : quarter * 3, quarter : quarter * 3])
    mouth = _mouth_crop(rgb, geometry, config)
    to_face = similarity(
        (geometry.mouth_x, geometry.mouth_y), geometry.angle, 1 / geometry.eyes, (0, 0)
    )
    lips = apply(to_face, lip_points)
    aligned = aligned_face(rgb, align_points)
    return Crops(
        face=face, face112=face112, mouth=mouth, aligned=aligned, lips=lips, box=geometry.box
    )


def align_points_of(points: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """The five identity landmarks ``(5, 2)`` of a mesh ``(468, 2)``, in template order."""
    right = points[list(RIGHT_EYE)].mean(axis=0)
    left = points[list(LEFT_EYE)].mean(axis=0)
    rest = points[[NOSE_TIP, *MOUTH_CORNERS]]
    return np.ascontiguousarray(np.vstack([right, left, rest]), dtype=np.float32)


def aligned_face(
    rgb: npt.NDArray[np.uint8], align_points: npt.NDArray[np.float32]
) -> npt.NDArray[np.uint8]:
    """The 112×112 RGB ArcFace-aligned crop for five landmarks ``(5, 2)``, source pixels."""
    matrix = fit_similarity(align_points, ARCFACE_TEMPLATE)
    out = cv2.warpAffine(
        rgb,
        matrix,
        (ALIGNED_SIDE, ALIGNED_SIDE),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(0, 0, 0),
    )
    return np.asarray(out, dtype=np.uint8)


def _face_crop(
    rgb: npt.NDArray[np.uint8], geometry: FaceGeometry, config: CropConfig
) -> npt.NDArray[np.uint8]:
    margin = 1 + config.crop_scale
    scale = config.face_side / (2 * geometry.half * margin)
    x0 = geometry.cx - geometry.half * margin
    y0 = geometry.cy - geometry.half
    matrix = np.array([[scale, 0.0, -scale * x0], [0.0, scale, -scale * y0]])
    pad = (config.pad_value,) * 3
    out = cv2.warpAffine(
        rgb,
        matrix,
        (config.face_side, config.face_side),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=pad,
    )
    return np.asarray(out, dtype=np.uint8)


def _mouth_crop(
    rgb: npt.NDArray[np.uint8], geometry: FaceGeometry, config: CropConfig
) -> npt.NDArray[np.uint8]:
    width, height = config.mouth_width, config.mouth_height
    scale = width / (config.mouth_span_eyes * geometry.eyes)
    matrix = similarity(
        (geometry.mouth_x, geometry.mouth_y), geometry.angle, scale, (width / 2, height / 2)
    )
    colour = cv2.warpAffine(
        rgb,
        matrix,
        (width, height),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REPLICATE,
    )
    return np.asarray(cv2.cvtColor(colour, cv2.COLOR_RGB2GRAY), dtype=np.uint8)


def lip_points_of(points: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """The 40 lip points ``(40, 2)`` of a mesh ``(468, 2)``."""
    return np.ascontiguousarray(points[list(LIP_POINTS)], dtype=np.float32)


def mouth_opening(lips: npt.NDArray[np.float32]) -> float:
    """Inner-lip opening of normalised lips ``(40, 2)``, in eye distances (points 13 and 14)."""
    upper, lower = LIP_POINTS.index(13), LIP_POINTS.index(14)
    return float(math.hypot(*(lips[lower] - lips[upper])))


def lip_outlines(lips: npt.NDArray[np.float32]) -> list[npt.NDArray[np.float32]]:
    """The outer and inner lip polygons of 40 lip points ``(40, 2)`` (in :data:`LIP_POINTS` order).

    Each line lists the lower lip from corner to corner, then the upper lip back.
    """
    outer = np.concatenate([lips[0:11], lips[11:20][::-1]])
    inner = np.concatenate([lips[20:31], lips[31:40][::-1]])
    return [outer, inner]
