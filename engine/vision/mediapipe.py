"""The default face back-end: mediapipe's BlazeFace and FaceMesh models run through LiteRT.

The two ``.tflite`` files ship inside the package (``engine/assets/mediapipe_face``, Apache-2.0).
mediapipe itself is not a dependency: its last release that carries these models pins NumPy < 2,
protobuf < 5 and jax, which our NumPy 2 stack (rocket-fft) cannot take. What mediapipe's graph
does around the models is reproduced here: the SSD anchors and box decoding of the short-range
detector, weighted non-maximum suppression, and the rotated regions of interest that feed the mesh.

Thread affinity: a :class:`MediapipeFaceBackend` owns two LiteRT interpreters, which are not
thread-safe. Use one back-end per stream (they are small: 1.5 MB of weights), from one thread.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.resources import as_file, files
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from engine.core.errors import UsageError
from engine.vision.backend import Detection, MeshResult
from engine.vision.geometry import Roi, angle_of, apply, invert, roi_around

DETECTOR_FILE = "face_detection_short_range.tflite"
MESH_FILE = "face_landmark.tflite"
DETECTOR_SIDE = 128
MESH_SIDE = 192
MESH_POINTS = 468
TILE_SHARE = 0.6
"""Each of the four detection tiles spans 60% of the frame's width and height."""
ROI_SCALE = 1.5
"""mediapipe's region around a face for the mesh: 1.5 × the longer side of the box."""
RIGHT_EYE_OUTER, LEFT_EYE_OUTER = 33, 263
"""Mesh points that set the rotation of the next region (mediapipe's landmarks-to-roi)."""


def _model_path(name: str) -> Path:
    resource = files("engine.assets") / "mediapipe_face" / name
    with as_file(resource) as path:
        return Path(path)


def _interpreter(name: str, threads: int) -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as error:  # pragma: no cover - a broken install
        raise UsageError(
            "the face back-end needs LiteRT: pip install ai-edge-litert (a talkscope dependency)"
        ) from error
    with _quiet_stderr():  # LiteRT prints "INFO: Created TensorFlow Lite XNNPACK delegate"
        interpreter = Interpreter(model_path=str(_model_path(name)), num_threads=threads)
        interpreter.allocate_tensors()
    return interpreter


_STDERR_LOCK = threading.Lock()


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (where native libraries log) for the duration of a load."""
    with _STDERR_LOCK:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError):  # no real stderr (embedded interpreter): nothing to silence
            yield
            return
        try:
            with open(os.devnull, "wb") as devnull:
                os.dup2(devnull.fileno(), 2)
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def ssd_anchors() -> npt.NDArray[np.float32]:
    """Anchor centres ``(896, 2)`` of the short-range detector, normalised to [0, 1].

    The SSD options of mediapipe's ``face_detection_short_range``: strides 8, 16, 16, 16 on a
    128×128 input, one aspect ratio plus the interpolated scale (2 anchors a layer), fixed anchor
    size; layers of the same stride share a grid, so 16×16×2 + 8×8×6 = 896.
    """
    centres: list[tuple[float, float]] = []
    for stride, per_cell in ((8, 2), (16, 6)):
        cells = DETECTOR_SIDE // stride
        for y in range(cells):
            for x in range(cells):
                centres.extend([((x + 0.5) / cells, (y + 0.5) / cells)] * per_cell)
    return np.asarray(centres, dtype=np.float32)


@dataclass(frozen=True)
class DetectorConfig:
    """Thresholds of the detector (mediapipe's defaults)."""

    min_score: float = 0.5
    nms_iou: float = 0.3
    tile_from_px: int = 640
    """Frames this large (longer side) are also searched in four overlapping tiles."""


class MediapipeFaceBackend:
    """BlazeFace (short range) for detection, FaceMesh (468 points) for landmarks.

    Args:
        threads: LiteRT threads per interpreter (1 keeps several streams on separate cores).
        detector: score and suppression thresholds.
    """

    name = "mediapipe-litert"

    def __init__(self, *, threads: int = 1, detector: DetectorConfig | None = None) -> None:
        """Load both models (about 10 ms)."""
        self.config = detector or DetectorConfig()
        self._detector = _interpreter(DETECTOR_FILE, threads)
        self._mesh = _interpreter(MESH_FILE, threads)
        self._anchors = ssd_anchors()
        det_out = {d["name"]: d["index"] for d in self._detector.get_output_details()}
        self._det_in = self._detector.get_input_details()[0]["index"]
        self._det_boxes, self._det_scores = det_out["regressors"], det_out["classificators"]
        mesh_out = sorted(self._mesh.get_output_details(), key=lambda d: -int(np.prod(d["shape"])))
        self._mesh_in = self._mesh.get_input_details()[0]["index"]
        self._mesh_points, self._mesh_score = mesh_out[0]["index"], mesh_out[1]["index"]

    def detect(self, rgb: npt.NDArray[np.uint8]) -> list[Detection]:
        """Faces in a frame ``(height, width, 3)`` RGB, best first, in source pixels.

        The whole frame is scaled to the detector's 128×128 input; on frames of at least
        ``tile_from_px`` on the longer side, a 2×2 grid of overlapping tiles is searched as well,
        so that small faces in wide shots (panels, tables) keep enough pixels.
        """
        height, width = rgb.shape[:2]
        found = [self._candidates(rgb, 0, 0)]
        if max(height, width) >= self.config.tile_from_px:
            tile_w, tile_h = int(width * TILE_SHARE), int(height * TILE_SHARE)
            for x0 in (0, width - tile_w):
                for y0 in (0, height - tile_h):
                    found.append(self._candidates(rgb[y0 : y0 + tile_h, x0 : x0 + tile_w], x0, y0))
        decoded = np.concatenate([d for d, _ in found])
        scores = np.concatenate([s for _, s in found])
        if scores.size == 0:
            return []
        return _weighted_nms(decoded, scores, self.config.nms_iou)

    def _candidates(
        self, rgb: npt.NDArray[np.uint8], x0: int, y0: int
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """Decoded boxes ``(n, 16)`` above the score threshold, offset by ``(x0, y0)``."""
        height, width = rgb.shape[:2]
        scale = DETECTOR_SIDE / max(height, width)
        new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
        small = cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_AREA)
        canvas = np.zeros((DETECTOR_SIDE, DETECTOR_SIDE, 3), dtype=np.float32)
        pad_x, pad_y = (DETECTOR_SIDE - new_w) // 2, (DETECTOR_SIDE - new_h) // 2
        canvas[pad_y : pad_y + new_h, pad_x : pad_x + new_w] = small * (2 / 255) - 1
        self._detector.set_tensor(self._det_in, canvas[None])
        self._detector.invoke()
        raw = self._detector.get_tensor(self._det_boxes)[0]
        logits = self._detector.get_tensor(self._det_scores)[0, :, 0]
        scores = 1 / (1 + np.exp(-np.clip(logits.astype(np.float64), -100, 100)))
        keep = np.flatnonzero(scores >= self.config.min_score)
        decoded = self._decode(raw[keep], keep)  # (n, 16) in 128-pixel canvas units
        decoded[:, 0::2] = (decoded[:, 0::2] - pad_x) / scale + x0
        decoded[:, 1::2] = (decoded[:, 1::2] - pad_y) / scale + y0
        return decoded, scores[keep]

    def _decode(
        self, raw: npt.NDArray[np.float32], keep: npt.NDArray[np.intp]
    ) -> npt.NDArray[np.float64]:
        anchors = self._anchors[keep].astype(np.float64) * DETECTOR_SIDE
        out = np.empty((raw.shape[0], 16), dtype=np.float64)
        cx, cy = raw[:, 0] + anchors[:, 0], raw[:, 1] + anchors[:, 1]
        half_w, half_h = raw[:, 2] / 2, raw[:, 3] / 2
        out[:, 0], out[:, 1], out[:, 2], out[:, 3] = (
            cx - half_w,
            cy - half_h,
            cx + half_w,
            cy + half_h,
        )
        out[:, 4::2] = raw[:, 4::2] + anchors[:, :1]
        out[:, 5::2] = raw[:, 5::2] + anchors[:, 1:2]
        return out

    def mesh(self, rgb: npt.NDArray[np.uint8], roi: Roi) -> MeshResult:
        """The 468 mesh points of the face in ``roi``, in source pixels, with a presence score."""
        to_crop = roi.to_crop(MESH_SIDE)
        crop = cv2.warpAffine(
            rgb,
            to_crop,
            (MESH_SIDE, MESH_SIDE),
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_REPLICATE,
        )
        self._mesh.set_tensor(self._mesh_in, (crop.astype(np.float32) * (1 / 255))[None])
        self._mesh.invoke()
        points = self._mesh.get_tensor(self._mesh_points).reshape(MESH_POINTS, 3)
        logit = float(self._mesh.get_tensor(self._mesh_score).reshape(-1)[0])
        score = 1 / (1 + math.exp(-max(-100.0, min(100.0, logit))))
        source = apply(invert(to_crop), points[:, :2])
        return MeshResult(points=source, score=score, roi=roi)

    @staticmethod
    def roi_from_detection(detection: Detection) -> Roi:
        """The mesh region for a fresh detection: eyes set the rotation (keypoints 0 and 1)."""
        rotation = angle_of(detection.keypoints[0], detection.keypoints[1])
        return roi_around(detection.box, rotation, ROI_SCALE)

    @staticmethod
    def roi_from_points(points: npt.NDArray[np.float32]) -> Roi:
        """The mesh region for the next frame, from this frame's mesh (mediapipe's tracking)."""
        rotation = angle_of(points[RIGHT_EYE_OUTER], points[LEFT_EYE_OUTER])
        x0, y0 = points.min(axis=0)
        x1, y1 = points.max(axis=0)
        return roi_around((float(x0), float(y0), float(x1), float(y1)), rotation, ROI_SCALE)


def _weighted_nms(
    decoded: npt.NDArray[np.float64], scores: npt.NDArray[np.float64], threshold: float
) -> list[Detection]:
    """Weighted NMS as mediapipe's: overlapping candidates are averaged, weighted by score."""
    order = np.argsort(-scores)
    boxes = decoded[:, :4]
    areas = np.maximum(0, boxes[:, 2] - boxes[:, 0]) * np.maximum(0, boxes[:, 3] - boxes[:, 1])
    remaining = order
    out: list[Detection] = []
    while remaining.size:
        best = remaining[0]
        ix = np.maximum(
            0,
            np.minimum(boxes[best, 2], boxes[remaining, 2])
            - np.maximum(boxes[best, 0], boxes[remaining, 0]),
        )
        iy = np.maximum(
            0,
            np.minimum(boxes[best, 3], boxes[remaining, 3])
            - np.maximum(boxes[best, 1], boxes[remaining, 1]),
        )
        inter = ix * iy
        overlap = inter / np.maximum(areas[best] + areas[remaining] - inter, 1e-9)
        group = remaining[overlap > threshold]
        weights = scores[group].astype(np.float64)
        merged = (decoded[group] * weights[:, None]).sum(axis=0) / weights.sum()
        out.append(
            Detection(
                box=(float(merged[0]), float(merged[1]), float(merged[2]), float(merged[3])),
                keypoints=merged[4:].reshape(6, 2).astype(np.float32),
                score=float(scores[best]),
            )
        )
        remaining = remaining[overlap <= threshold]
    return out
