"""Offline face analysis: the tracks of a file (or any source), and an optional preview video.

Source -> FaceStage (the live engine's own stage) -> a report per track: first and last frame on
the 25 fps grid, frames with crops, median box. ``preview`` also writes an H.264 video with every
face's box, track id and lip outline drawn, so a person can check the tracker by eye.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
import numpy.typing as npt

from engine.core.errors import UsageError
from engine.core.frame import NS_PER_S, Frame, FrameKind
from engine.core.stage import Pipeline
from engine.sources import open_source
from engine.vision.crops import lip_outlines
from engine.vision.stage import (
    FaceConfig,
    FaceCrops,
    FaceStage,
    FaceStatus,
    TrackEnded,
    TrackStarted,
    median_box,
)

PREVIEW_COLOURS = ((0, 200, 255), (255, 120, 0), (60, 220, 60), (230, 60, 200), (255, 220, 0))


@dataclass
class TrackReport:
    """One face track of a source (frames are indices on the stream's 25 fps grid)."""

    track_id: int
    first_frame: int
    last_frame: int
    frames: int
    box: list[float]
    first_s: float
    last_s: float


@dataclass
class FacesReport:
    """Every track of one source, with the states the face stage went through."""

    source: str
    video_frames: int = 0
    video_size: list[int] = field(default_factory=list)
    tracks: list[TrackReport] = field(default_factory=list)
    states: list[str] = field(default_factory=list)
    detections_run: int = 0
    seconds: float = 0.0
    ms_per_frame: float = 0.0
    preview: str | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


class _Tracks:
    """Collects crops and track events into :class:`TrackReport` s."""

    def __init__(self, origin_ns: int | None = None) -> None:
        self.origin_ns = origin_ns
        self.first: dict[int, FaceCrops] = {}
        self.last: dict[int, FaceCrops] = {}
        self.frames: dict[int, int] = {}
        self.boxes: dict[int, list[tuple[float, float, float, float]]] = {}
        self.done: list[TrackReport] = []

    def add(self, item: FaceCrops | TrackEnded) -> None:
        if isinstance(item, FaceCrops):
            self.first.setdefault(item.track_id, item)
            self.last[item.track_id] = item
            self.frames[item.track_id] = self.frames.get(item.track_id, 0) + 1
            self.boxes.setdefault(item.track_id, []).append(item.box)
            return
        self.boxes.pop(item.track_id, None)
        first, last = self.first.get(item.track_id), self.last.get(item.track_id)
        if first is None or last is None:
            return
        origin = self.origin_ns or 0
        self.done.append(
            TrackReport(
                track_id=item.track_id,
                first_frame=first.seq,
                last_frame=last.seq,
                frames=self.frames[item.track_id],
                box=[round(v, 1) for v in item.box],
                first_s=round((first.pts_ns - origin) / NS_PER_S, 3),
                last_s=round((last.pts_ns - origin) / NS_PER_S, 3),
            )
        )

    def finish(self) -> None:
        """Report the tracks still open when reading stopped early (``--seconds``)."""
        for track_id, boxes in list(self.boxes.items()):
            last = self.last[track_id]
            self.add(
                TrackEnded(last.stream_id, track_id, last.pts_ns, median_box(boxes), len(boxes))
            )


async def analyse_faces(
    uri: str,
    *,
    config: FaceConfig | None = None,
    preview: Path | None = None,
    max_seconds: float | None = None,
) -> FacesReport:
    """Track the faces of one source.

    Args:
        uri: path, URL or ``device:`` URI.
        config: tracker and crop settings.
        preview: write an annotated H.264 video here (overwrites it).
        max_seconds: stop after this much video (live sources never end by themselves).

    Raises:
        EngineError: the source cannot be opened or fails.
        UsageError: the preview path cannot be written.
    """
    report = FacesReport(source=uri)
    stage = FaceStage(config)
    tracks = _Tracks()
    writer = PreviewWriter(preview, delay=_preview_delay(stage.config)) if preview else None
    started = time.perf_counter()
    source = open_source(uri)
    try:
        async with source, Pipeline[Any](source, [stage], capacity=16) as pipe:
            async for item in pipe.outputs():
                if isinstance(item, FaceCrops | TrackEnded):
                    tracks.add(item)
                elif isinstance(item, FaceStatus):
                    report.states.append(item.state.value)
                elif isinstance(item, Frame) and item.kind is FrameKind.VIDEO:
                    if tracks.origin_ns is None:
                        tracks.origin_ns = item.pts_ns
                    report.video_frames += 1
                    report.video_size = [int(item.data.shape[1]), int(item.data.shape[0])]
                    if max_seconds is not None and report.video_frames >= max_seconds * 25:
                        break
                if writer is not None and not isinstance(item, TrackStarted | FaceStatus):
                    writer.add(item)
    finally:
        if writer is not None:
            writer.close()
    tracks.finish()
    report.seconds = round(time.perf_counter() - started, 3)
    report.tracks = sorted(tracks.done, key=lambda t: t.track_id)
    report.detections_run = sum(p.tracker.detections_run for p in stage.processors.values())
    if report.video_frames:
        report.ms_per_frame = round(1000 * report.seconds / report.video_frames, 2)
    report.preview = str(preview) if preview else None
    return report


def _preview_delay(config: FaceConfig) -> int:
    """Frames to hold back so that every crop of a frame arrives before the frame is drawn."""
    return config.crops.smooth_lag_frames + config.tracker.death_frames + 2


class PreviewWriter:
    """Draws boxes, track ids and lips on the video and encodes it (H.264, 25 fps).

    Frames are held back ``delay`` frames, because the crops of a frame arrive after it.

    Args:
        path: the output file (its extension picks the container; ``.mp4`` is a good choice).
        delay: frames to hold back.
    """

    def __init__(self, path: Path, *, delay: int) -> None:
        """Open the output."""
        try:
            self._out = av.open(str(path), "w")
        except (av.error.FFmpegError, OSError, ValueError) as error:
            raise UsageError(f"cannot write preview {path}: {error}") from None
        self._stream: Any = None
        self._delay = delay
        self._frames: deque[Frame] = deque()
        self._faces: dict[int, list[FaceCrops]] = {}

    def add(self, item: object) -> None:
        """Take a video frame or a face's crops (anything else is ignored)."""
        if isinstance(item, FaceCrops):
            self._faces.setdefault(item.seq, []).append(item)
        elif isinstance(item, Frame) and item.kind is FrameKind.VIDEO:
            self._frames.append(item)
            while len(self._frames) > self._delay:
                self._write(self._frames.popleft())

    def close(self) -> None:
        """Write what is held and finish the file. Idempotent."""
        while self._frames:
            self._write(self._frames.popleft())
        if self._stream is not None:
            for packet in self._stream.encode(None):
                self._out.mux(packet)
            self._stream = None
        self._out.close()

    def _write(self, frame: Frame) -> None:
        picture = draw_faces(frame.data, self._faces.pop(frame.seq, []))
        height, width = picture.shape[:2]
        if self._stream is None:
            self._stream = self._out.add_stream("libx264", rate=25)
            self._stream.width, self._stream.height = width - width % 2, height - height % 2
            self._stream.pix_fmt = "yuv420p"
        picture = np.ascontiguousarray(picture[: self._stream.height, : self._stream.width])
        video = av.VideoFrame.from_ndarray(picture, format="rgb24")
        for packet in self._stream.encode(video):
            self._out.mux(packet)


def draw_faces(rgb: npt.NDArray[np.uint8], faces: list[FaceCrops]) -> npt.NDArray[np.uint8]:
    """A copy of the picture with each face's box, track id and lip outline."""
    canvas = rgb.copy()
    thickness = max(1, round(max(canvas.shape[:2]) / 400))
    for face in faces:
        colour = PREVIEW_COLOURS[face.track_id % len(PREVIEW_COLOURS)]
        x0, y0, x1, y1 = (round(v) for v in face.box)
        cv2.rectangle(canvas, (x0, y0), (x1, y1), colour, thickness)
        label = f"#{face.track_id}" + ("" if face.observed else " ?")
        cv2.putText(
            canvas,
            label,
            (x0, max(12, y0 - 4)),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.4 * thickness,
            colour,
            thickness,
        )
        outlines = [np.round(line).astype(np.int32) for line in lip_outlines(face.lip_points)]
        cv2.polylines(canvas, outlines, True, colour, thickness)
    return canvas
