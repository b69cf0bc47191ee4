"""The face back-end interface: what the tracker needs from a detector and a landmark model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from engine.vision.geometry import Box, Roi


@dataclass(frozen=True, slots=True)
class Detection:
    """A detected face: box and keypoints in source pixels, score in [0, 1].

    ``keypoints`` ``(6, 2)``: right eye, left eye, nose tip, mouth centre, right ear, left ear
    (the subject's right and left: the right eye is on the image's left for a frontal face).
    """

    box: Box
    keypoints: npt.NDArray[np.float32]
    score: float


@dataclass(frozen=True, slots=True)
class MeshResult:
    """Dense landmarks of one face: ``points`` ``(468, 2)`` in source pixels, presence score."""

    points: npt.NDArray[np.float32]
    score: float
    roi: Roi


class FaceBackend(Protocol):
    """Detects faces in a frame and fits landmarks in a region; one instance per thread."""

    name: str

    def detect(self, rgb: npt.NDArray[np.uint8]) -> list[Detection]:
        """Faces in a frame ``(height, width, 3)`` RGB uint8, best first."""
        ...

    def mesh(self, rgb: npt.NDArray[np.uint8], roi: Roi) -> MeshResult:
        """Landmarks of the face inside ``roi``, with the model's face-presence score."""
        ...

    def roi_from_detection(self, detection: Detection) -> Roi:
        """The landmark region for a new detection."""
        ...

    def roi_from_points(self, points: npt.NDArray[np.float32]) -> Roi:
        """The landmark region for the next frame, from this frame's landmarks."""
        ...
