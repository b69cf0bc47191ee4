"""The face stage: video frames in, track events and per-track crops out.

:class:`FaceProcessor` is the synchronous core for one stream (tracker + smoothing + crops);
:class:`FaceStage` runs one processor per stream in a worker thread, so the event loop never
waits on a model, and passes every other item through unchanged.

Outputs, all stamped with the source ``pts_ns`` of the picture they describe:

- :class:`TrackStarted` when a track is confirmed (its ``pts_ns`` is its first frame's),
- :class:`FaceCrops` for every frame of a confirmed track, ``lag`` frames after the picture,
- :class:`TrackEnded` after the last crops of a track,
- :class:`FaceStatus` when the stream's state changes (searching, tracking, too small).

A jump of more than ``max_gap_ns`` in the video timeline (an outage, a reconnect) ends every track
first: what follows may be another scene.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from engine.core.frame import NS_PER_S, Frame, FrameKind
from engine.vision.backend import FaceBackend
from engine.vision.crops import (
    CropConfig,
    FaceGeometry,
    align_points_of,
    cut,
    geometry_of,
    lip_points_of,
    smooth,
)
from engine.vision.geometry import Box
from engine.vision.tracker import FaceTracker, TrackerConfig, TrackerState, TrackSummary


@dataclass(frozen=True, slots=True)
class TrackStarted:
    """A face track was confirmed; ``box`` is its first box, source pixels."""

    stream_id: str
    track_id: int
    pts_ns: int
    box: Box


@dataclass(frozen=True, slots=True)
class TrackEnded:
    """A face track ended at ``pts_ns`` (its last frame) after ``frames`` frames with crops."""

    stream_id: str
    track_id: int
    pts_ns: int
    box: Box
    frames: int


@dataclass(frozen=True, slots=True)
class FaceStatus:
    """The stream's face state changed (``tracks``: confirmed tracks now)."""

    stream_id: str
    pts_ns: int
    state: TrackerState
    tracks: int


@dataclass(frozen=True, slots=True)
class FaceCrops:
    """One face in one frame: its crops, smoothed box and raw lip points.

    Attributes:
        stream_id: the source stream.
        track_id: the track (unique within the stream).
        pts_ns: the picture's timestamp.
        seq: the picture's sequence number in its stream.
        box: smoothed face box ``(x0, y0, x1, y1)``, source pixels.
        face: SyncNet v2 crop ``(224, 224, 3)`` RGB uint8.
        face112: Light-ASD crop ``(112, 112)`` grey uint8.
        mouth: mouth crop ``(48, 96)`` grey uint8 (sizes from :class:`CropConfig`).
        aligned: ArcFace-aligned identity crop ``(112, 112, 3)`` RGB uint8.
        lips: the 40 lip points in the stabilised face frame ``(40, 2)`` float32.
        lip_points: the 40 lip points in source pixels ``(40, 2)`` float32.
        observed: False when the face was not seen in this frame and the crop comes from its
            neighbours (a short miss inside the track).
    """

    stream_id: str
    track_id: int
    pts_ns: int
    seq: int
    box: Box
    face: npt.NDArray[np.uint8]
    face112: npt.NDArray[np.uint8]
    mouth: npt.NDArray[np.uint8]
    aligned: npt.NDArray[np.uint8]
    lips: npt.NDArray[np.float32]
    lip_points: npt.NDArray[np.float32]
    observed: bool


FaceOutput = TrackStarted | TrackEnded | FaceStatus | FaceCrops


@dataclass(frozen=True)
class FaceConfig:
    """Tracker and crop settings of a face stage."""

    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    crops: CropConfig = field(default_factory=CropConfig)
    max_gap_ns: int = NS_PER_S // 2


@dataclass
class _Entry:
    index: int
    frame: Frame
    geometry: FaceGeometry | None
    lip_points: npt.NDArray[np.float32] | None
    align_points: npt.NDArray[np.float32] | None = None


@dataclass
class _Buffer:
    """The frames of one track that have not been cut yet."""

    track_id: int
    pending: list[_Entry] = field(default_factory=list)
    history: list[_Entry] = field(default_factory=list)
    confirmed: bool = False
    emitted: int = 0
    last_observed: int = -1
    boxes: list[Box] = field(default_factory=list)


def default_backend() -> FaceBackend:
    """The default back-end: BlazeFace + FaceMesh through LiteRT, one thread."""
    from engine.vision.mediapipe import MediapipeFaceBackend

    return MediapipeFaceBackend(threads=1)


class FaceProcessor:
    """Tracks the faces of one stream and cuts their crops (synchronous; one thread at a time).

    Args:
        stream_id: the stream whose video frames this processor takes.
        config: tracker, crops and gap settings.
        backend: detector and mesh model (default: :func:`default_backend`).
    """

    def __init__(
        self,
        stream_id: str,
        config: FaceConfig | None = None,
        backend: FaceBackend | None = None,
    ) -> None:
        """Create the tracker (loads the models)."""
        self.stream_id = stream_id
        self.config = config or FaceConfig()
        self.tracker = FaceTracker(backend or default_backend(), self.config.tracker)
        self._buffers: dict[int, _Buffer] = {}
        self._state: TrackerState | None = None
        self._last_pts: int | None = None
        self.frames = 0

    @property
    def lag(self) -> int:
        """Frames between a picture and its crops."""
        return self.config.crops.smooth_lag_frames

    def push(self, frame: Frame) -> list[FaceOutput]:
        """Process one video frame; returns what became ready (crops are ``lag`` frames late)."""
        if frame.kind is not FrameKind.VIDEO:
            return []
        out: list[FaceOutput] = []
        if self._last_pts is not None and frame.pts_ns - self._last_pts > self.config.max_gap_ns:
            out.extend(self._end_tracks(self.tracker.finish(), frame.pts_ns))
        self._last_pts = frame.pts_ns
        self.frames += 1
        update = self.tracker.update(frame.data)
        for observation in update.observations:
            buffer = self._buffers.setdefault(observation.track_id, _Buffer(observation.track_id))
            geometry = geometry_of(observation.points, observation.box)
            entry = _Entry(
                update.index,
                frame,
                geometry,
                lip_points_of(observation.points),
                align_points_of(observation.points),
            )
            buffer.pending.append(entry)
            buffer.last_observed = update.index
        seen = {o.track_id for o in update.observations}
        for summary in self.tracker.tracks:  # alive but not seen in this frame: a short miss
            missed = self._buffers.get(summary.track_id)
            if missed is not None and summary.track_id not in seen:
                missed.pending.append(_Entry(update.index, frame, None, None))
        for tid in update.discarded:
            self._buffers.pop(tid, None)
        out.extend(self._end_tracks(update.ended, frame.pts_ns))
        for tid in update.confirmed:
            out.append(self._start(tid))
        for buffer in self._buffers.values():
            if buffer.confirmed:
                out.extend(self._emit(buffer, until=update.index - self.lag))
        out.extend(self._status(update.state, frame.pts_ns))
        return out

    def finish(self) -> list[FaceOutput]:
        """End every track (the stream ended): their remaining crops, then their ends."""
        pts = self._last_pts if self._last_pts is not None else 0
        return self._end_tracks(self.tracker.finish(), pts)

    def _start(self, track_id: int) -> TrackStarted:
        buffer = self._buffers[track_id]
        buffer.confirmed = True
        first = next(e for e in buffer.pending if e.geometry is not None)
        assert first.geometry is not None
        return TrackStarted(self.stream_id, track_id, first.frame.pts_ns, first.geometry.box)

    def _end_tracks(self, ended: list[TrackSummary], pts_ns: int) -> list[FaceOutput]:
        out: list[FaceOutput] = []
        for summary in ended:
            buffer = self._buffers.pop(summary.track_id, None)
            if buffer is None or not buffer.confirmed:
                continue
            out.extend(self._emit(buffer, until=buffer.last_observed))
            last = buffer.history[-1].frame.pts_ns if buffer.history else pts_ns
            box = median_box(buffer.boxes) if buffer.boxes else summary.box
            out.append(TrackEnded(self.stream_id, summary.track_id, last, box, buffer.emitted))
        return out

    def _emit(self, buffer: _Buffer, *, until: int) -> list[FaceOutput]:
        """Cut the pending frames up to index ``until`` (and no later than the last seen)."""
        out: list[FaceOutput] = []
        limit = min(until, buffer.last_observed)
        while buffer.pending and buffer.pending[0].index <= limit:
            entry = buffer.pending.pop(0)
            crops = self._cut(buffer, entry)
            buffer.history.append(entry)
            del buffer.history[: -self.lag - 1 or None]
            buffer.emitted += 1
            buffer.boxes.append(crops.box)
            out.append(crops)
        return out

    def _cut(self, buffer: _Buffer, entry: _Entry) -> FaceCrops:
        window = [
            e.geometry
            for e in (*buffer.history, *buffer.pending[: self.lag], entry)
            if e.geometry is not None and abs(e.index - entry.index) <= self.lag
        ]
        geometry = smooth(window)
        nearest = entry if entry.lip_points is not None else self._nearest_observed(buffer)
        assert nearest.lip_points is not None and nearest.align_points is not None
        crops = cut(
            entry.frame.data, geometry, nearest.lip_points, self.config.crops, nearest.align_points
        )
        return FaceCrops(
            stream_id=self.stream_id,
            track_id=buffer.track_id,
            pts_ns=entry.frame.pts_ns,
            seq=entry.frame.seq,
            box=crops.box,
            face=crops.face,
            face112=crops.face112,
            mouth=crops.mouth,
            aligned=crops.aligned,
            lips=crops.lips,
            lip_points=nearest.lip_points,
            observed=entry.geometry is not None,
        )

    @staticmethod
    def _nearest_observed(buffer: _Buffer) -> _Entry:
        for entry in (*reversed(buffer.history), *buffer.pending):
            if entry.lip_points is not None:
                return entry
        raise AssertionError("a track always has an observed frame")  # pragma: no cover

    def _status(self, state: TrackerState, pts_ns: int) -> list[FaceOutput]:
        if state is self._state:
            return []
        self._state = state
        tracks = sum(1 for b in self._buffers.values() if b.confirmed)
        return [FaceStatus(self.stream_id, pts_ns, state, tracks)]


def median_box(boxes: list[Box]) -> Box:
    """The per-coordinate median of a track's boxes (what ``TrackEnded`` reports)."""
    x0, y0, x1, y1 = (float(v) for v in np.median(np.asarray(boxes), axis=0))
    return x0, y0, x1, y1


class FaceStage:
    """Runs a :class:`FaceProcessor` per stream in a worker thread; other items pass through.

    Args:
        config: settings shared by every stream's processor.
        backend_factory: makes one back-end per stream (default: :func:`default_backend`).
        pass_through: also yield the input items (video frames included), in order.
        name: shown in pipeline errors and stats.
    """

    def __init__(
        self,
        config: FaceConfig | None = None,
        *,
        backend_factory: Callable[[], FaceBackend] = default_backend,
        pass_through: bool = True,
        name: str = "faces",
    ) -> None:
        """See the class docstring."""
        self.config = config or FaceConfig()
        self.name = name
        self._factory = backend_factory
        self._pass = pass_through
        self.processors: dict[str, FaceProcessor] = {}

    async def run(self, src: AsyncIterator[object]) -> AsyncIterator[object]:
        """Yield face outputs (and, with ``pass_through``, every input) until ``src`` ends."""
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(1, thread_name_prefix="talkscope-faces") as pool:
            async for item in src:
                if isinstance(item, Frame) and item.kind is FrameKind.VIDEO:
                    processor = await self._processor(item.stream_id, loop, pool)
                    for out in await loop.run_in_executor(pool, processor.push, item):
                        yield out
                if self._pass:
                    yield item
            for processor in self.processors.values():
                for out in await loop.run_in_executor(pool, processor.finish):
                    yield out

    async def _processor(
        self, stream_id: str, loop: asyncio.AbstractEventLoop, pool: ThreadPoolExecutor
    ) -> FaceProcessor:
        processor = self.processors.get(stream_id)
        if processor is None:
            backend = await loop.run_in_executor(pool, self._factory)
            processor = FaceProcessor(stream_id, self.config, backend)
            self.processors[stream_id] = processor
        return processor
