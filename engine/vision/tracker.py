"""Face tracks: detection every k frames, landmark tracking in between, ids that stay put.

Per frame, every live track is followed by fitting the mesh in the region its last landmarks
predict (mediapipe's own tracking loop: no detector needed while the face stays). When the mesh
loses a face (a hand over the mouth, a profile), the detector runs on that frame, and a detection
on the track keeps it alive with the mesh refitted on the detection. The detector
runs every ``k`` frames, where ``k`` grows while the scene is stable (every detection matched a
track, nothing new) and drops back to ``min_detect_interval`` as soon as something changes (a
track lost, a new face, a scene cut). Detections are matched to tracks by overlap; an unmatched
detection opens a *tentative* track that is confirmed after ``birth_frames`` observed frames in a
row, and a track that is not seen for ``death_frames`` frames ends. A scene cut (the whole picture
changes at once) ends every track.

Not thread-safe: one tracker per stream, used from one thread at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import cv2
import numpy as np
import numpy.typing as npt

from engine.vision.backend import Detection, FaceBackend, MeshResult
from engine.vision.geometry import Box, bounds, iou

MIN_FRAME_SIDE = 32
"""Frames smaller than this on either side cannot hold a detectable face: not searched."""


class TrackerState(Enum):
    """What the tracker is doing on a stream (reported to users as it changes)."""

    SEARCHING = "searching"
    """No face at the moment; the detector runs often."""
    TRACKING = "tracking"
    """At least one confirmed face track."""
    TOO_SMALL = "too_small"
    """The picture is too small to hold a face (e.g. a 1×1 video)."""


@dataclass(frozen=True)
class TrackerConfig:
    """Knobs of the tracker; the defaults suit 25 fps talking-head and conversation video.

    Attributes:
        max_faces: most tracks at once (new faces beyond it are ignored).
        min_detect_interval: detector period (frames) after a change.
        max_detect_interval: detector period (frames) once the scene is stable.
        empty_detect_interval: detector period (frames) while nothing is tracked.
        min_presence: mesh face-presence score below which the mesh alone does not keep a track
            (the detector can: an occluded mouth fails the mesh but not the detector).
        min_detection_score: detector score for opening a track or keeping one alive.
        birth_frames: observed frames in a row that confirm a new track, provided that the mesh
            was once confident (presence >= ``min_presence``) or the detector was
            (>= ``birth_detection_score``); a weak candidate that never is, is dropped after
            ``max_tentative`` frames (its crops are never emitted).
        death_frames: frames without an observation that end a track.
        match_iou: overlap at which a detection belongs to a track.
        duplicate_iou: overlap at which two tracks are the same face (the younger ends).
        scene_cut: mean absolute change of a 32×32 grey thumbnail (0..1) that counts as a cut.
    """

    max_faces: int = 8
    min_detect_interval: int = 1
    max_detect_interval: int = 10
    empty_detect_interval: int = 2
    min_presence: float = 0.5
    min_detection_score: float = 0.5
    birth_frames: int = 2
    birth_detection_score: float = 0.75
    max_tentative: int = 25
    death_frames: int = 6
    match_iou: float = 0.25
    duplicate_iou: float = 0.5
    scene_cut: float = 0.2


@dataclass(frozen=True, slots=True)
class Observation:
    """One track seen in one frame: mesh points ``(468, 2)`` and their box, source pixels."""

    track_id: int
    points: npt.NDArray[np.float32]
    box: Box
    score: float
    confirmed: bool


@dataclass(frozen=True, slots=True)
class TrackSummary:
    """A track's life so far: frame indices (tracker's own count), frames observed, last box."""

    track_id: int
    first_index: int
    last_index: int
    observed: int
    box: Box


@dataclass(frozen=True, slots=True)
class TrackerUpdate:
    """What one frame changed.

    Attributes:
        index: the frame's index in this tracker (0, 1, ...).
        observations: tracks seen in this frame, tentative ones included (``confirmed`` says).
        confirmed: tracks confirmed by this frame (their tentative frames become real).
        ended: confirmed tracks that ended at this frame (not seen for ``death_frames``, a scene
            cut, or merged into an older duplicate).
        discarded: tentative tracks dropped before confirmation (never reported as tracks).
        detected: whether the detector ran on this frame.
        scene_cut: whether this frame starts a new shot.
        state: the tracker's state after this frame.
    """

    index: int
    observations: list[Observation]
    confirmed: list[int]
    ended: list[TrackSummary]
    discarded: list[int]
    detected: bool
    scene_cut: bool
    state: TrackerState


@dataclass
class _Track:
    track_id: int
    first_index: int
    points: npt.NDArray[np.float32]
    box: Box
    last_seen: int
    streak: int = 1
    observed: int = 1
    confirmed: bool = False
    best_mesh: float = 0.0
    best_detection: float = 0.0

    def summary(self) -> TrackSummary:
        return TrackSummary(
            self.track_id, self.first_index, self.last_seen, self.observed, self.box
        )


@dataclass
class _Frame:
    """What one update is building."""

    index: int
    seen: dict[int, MeshResult] = field(default_factory=dict)
    ended: list[TrackSummary] = field(default_factory=list)
    discarded: list[int] = field(default_factory=list)
    confirmed: list[int] = field(default_factory=list)


class FaceTracker:
    """Follows the faces of one stream frame by frame.

    Args:
        backend: detector and landmark model (one per tracker: not thread-safe).
        config: thresholds and periods.
    """

    def __init__(self, backend: FaceBackend, config: TrackerConfig | None = None) -> None:
        """Start with no track; the first frame runs the detector."""
        self.backend = backend
        self.config = config or TrackerConfig()
        self._tracks: dict[int, _Track] = {}
        self._next_id = 1
        self._index = -1
        self._since_detect = 1 << 30
        self._interval = self.config.min_detect_interval
        self._thumb: npt.NDArray[np.float32] | None = None
        self.detections_run = 0

    @property
    def tracks(self) -> list[TrackSummary]:
        """The live tracks (tentative ones included)."""
        return [t.summary() for t in self._tracks.values()]

    def update(self, rgb: npt.NDArray[np.uint8]) -> TrackerUpdate:
        """Process the next frame ``(height, width, 3)`` RGB uint8 of the stream."""
        self._index += 1
        work = _Frame(self._index)
        if min(rgb.shape[:2]) < MIN_FRAME_SIDE:
            self._end_all(work)
            return self._result(work, detected=False, cut=False, state=TrackerState.TOO_SMALL)
        cut = self._scene_cut(rgb)
        if cut:
            self._end_all(work)
        lost = self._follow(rgb, work)
        detected = self._detect_due(lost)
        if detected:
            self._detect(rgb, work)
        self._since_detect = 0 if detected else self._since_detect + 1
        self._settle(work)
        state = TrackerState.TRACKING if self._has_confirmed() else TrackerState.SEARCHING
        return self._result(work, detected=detected, cut=cut, state=state)

    def finish(self) -> list[TrackSummary]:
        """End every confirmed track (the stream ended); returns them."""
        work = _Frame(self._index)
        self._end_all(work)
        return work.ended

    def _result(
        self, work: _Frame, *, detected: bool, cut: bool, state: TrackerState
    ) -> TrackerUpdate:
        observations = [
            Observation(
                tid, mesh.points, self._tracks[tid].box, mesh.score, self._tracks[tid].confirmed
            )
            for tid, mesh in work.seen.items()
            if tid in self._tracks
        ]
        return TrackerUpdate(
            index=work.index,
            observations=observations,
            confirmed=work.confirmed,
            ended=work.ended,
            discarded=work.discarded,
            detected=detected,
            scene_cut=cut,
            state=state,
        )

    def _scene_cut(self, rgb: npt.NDArray[np.uint8]) -> bool:
        step = max(1, min(rgb.shape[:2]) // 64)
        grey = cv2.cvtColor(np.ascontiguousarray(rgb[::step, ::step]), cv2.COLOR_RGB2GRAY)
        small = cv2.resize(grey, (32, 32), interpolation=cv2.INTER_AREA)
        thumb = np.asarray(small, dtype=np.float32) * np.float32(1 / 255)
        previous, self._thumb = self._thumb, thumb
        if previous is None:
            return False
        return float(np.mean(np.abs(thumb - previous))) > self.config.scene_cut

    def _follow(self, rgb: npt.NDArray[np.uint8], work: _Frame) -> bool:
        """Fit the mesh of every track where its last landmarks say; True if one was lost."""
        lost = False
        for track in self._tracks.values():
            mesh = self.backend.mesh(rgb, self.backend.roi_from_points(track.points))
            if mesh.score >= self.config.min_presence:
                work.seen[track.track_id] = mesh
            else:
                lost = True
        return lost

    def _detect_due(self, lost: bool) -> bool:
        if lost:
            self._interval = self.config.min_detect_interval
            return True
        if not self._tracks:
            return self._since_detect >= self.config.empty_detect_interval
        return self._since_detect >= self._interval

    def _detect(self, rgb: npt.NDArray[np.uint8], work: _Frame) -> None:
        self.detections_run += 1
        detections = [
            d for d in self.backend.detect(rgb) if d.score >= self.config.min_detection_score
        ]
        changed = False
        unmatched = self._match(rgb, detections, work)
        for detection in unmatched:
            changed |= self._adopt_or_open(rgb, detection, work)
        if any(t.track_id not in work.seen for t in self._tracks.values()):
            changed = True
        if changed:
            self._interval = self.config.min_detect_interval
        else:
            self._interval = min(self._interval * 2, self.config.max_detect_interval)

    def _match(
        self, rgb: npt.NDArray[np.uint8], detections: list[Detection], work: _Frame
    ) -> list[Detection]:
        """Pair detections with tracks by overlap; return those that belong to none."""
        boxes = {
            tid: bounds(work.seen[tid].points) if tid in work.seen else track.box
            for tid, track in self._tracks.items()
        }
        pairs = sorted(
            (
                (iou(d.box, box), i, tid)
                for i, d in enumerate(detections)
                for tid, box in boxes.items()
            ),
            reverse=True,
        )
        used_d: set[int] = set()
        used_t: set[int] = set()
        for overlap, i, tid in pairs:
            if overlap < self.config.match_iou or i in used_d or tid in used_t:
                continue
            used_d.add(i)
            used_t.add(tid)
            track = self._tracks[tid]
            track.best_detection = max(track.best_detection, detections[i].score)
            if tid not in work.seen:  # the mesh lost it, the detector still sees it
                work.seen[tid] = self.backend.mesh(
                    rgb, self.backend.roi_from_detection(detections[i])
                )
        return [d for i, d in enumerate(detections) if i not in used_d]

    def _adopt_or_open(
        self, rgb: npt.NDArray[np.uint8], detection: Detection, work: _Frame
    ) -> bool:
        """Open a tentative track for a new face; True if one opened."""
        if len(self._tracks) >= self.config.max_faces:
            return False
        mesh = self.backend.mesh(rgb, self.backend.roi_from_detection(detection))
        box = bounds(mesh.points)
        if any(iou(box, bounds(m.points)) > self.config.duplicate_iou for m in work.seen.values()):
            return False
        track = _Track(
            self._next_id, work.index, mesh.points, box, work.index, streak=0, observed=0
        )
        track.best_detection = detection.score
        self._next_id += 1
        self._tracks[track.track_id] = track
        work.seen[track.track_id] = mesh
        return True

    def _settle(self, work: _Frame) -> None:
        """Apply this frame's observations: streaks, confirmations, deaths, duplicates."""
        for tid, mesh in work.seen.items():
            track = self._tracks[tid]
            track.points, track.box = mesh.points, bounds(mesh.points)
            track.streak = track.streak + 1 if track.last_seen >= work.index - 1 else 1
            track.observed += 1
            track.last_seen = work.index
            track.best_mesh = max(track.best_mesh, mesh.score)
            if not track.confirmed and self._born(track):
                track.confirmed = True
                work.confirmed.append(tid)
        self._drop_duplicates(work)
        for track in list(self._tracks.values()):
            missing = work.index - track.last_seen
            if track.confirmed and missing >= self.config.death_frames:
                self._end(track, work)
            elif not track.confirmed and (
                missing > 0 or track.observed > self.config.max_tentative
            ):
                self._end(track, work)

    def _born(self, track: _Track) -> bool:
        """Seen long enough, and once with a confident mesh or a confident detection."""
        sure = (
            track.best_mesh >= self.config.min_presence
            or track.best_detection >= self.config.birth_detection_score
        )
        return track.streak >= self.config.birth_frames and sure

    def _drop_duplicates(self, work: _Frame) -> None:
        ordered = sorted(self._tracks.values(), key=lambda t: t.track_id)
        for i, older in enumerate(ordered):
            for younger in ordered[i + 1 :]:
                if younger.track_id not in self._tracks or older.track_id not in self._tracks:
                    continue
                if iou(older.box, younger.box) > self.config.duplicate_iou:
                    work.seen.pop(younger.track_id, None)
                    self._end(younger, work)

    def _end(self, track: _Track, work: _Frame) -> None:
        del self._tracks[track.track_id]
        if track.track_id in work.confirmed:  # confirmed and gone in one frame: never reported
            work.confirmed.remove(track.track_id)
            track.confirmed = False
        if track.confirmed:
            work.ended.append(track.summary())
        else:
            work.discarded.append(track.track_id)

    def _end_all(self, work: _Frame) -> None:
        for track in list(self._tracks.values()):
            work.seen.pop(track.track_id, None)
            self._end(track, work)
        self._interval = self.config.min_detect_interval
        self._since_detect = 1 << 30

    def _has_confirmed(self) -> bool:
        return any(t.confirmed for t in self._tracks.values())
