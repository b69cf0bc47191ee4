"""Decode a clip once into what the sync models need: per-track crops and the stream's MFCC.

Source -> MfccStage -> FaceStage (the live engine's stages) -> :class:`ClipFeatures`. Used by the
offline ``talkscope sync`` and by training-data preparation, so both see exactly the crops and
MFCC that the live engine computes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from engine.core.errors import InputError
from engine.core.frame import Frame, FrameKind
from engine.core.stage import Pipeline
from engine.dsp.stage import MfccBlock, MfccStage
from engine.sources import open_source
from engine.vision.stage import FaceConfig, FaceCrops, FaceStage, TrackEnded, median_box


@dataclass
class TrackFeatures:
    """One face track's frames, in time order.

    Attributes:
        track_id: the track (unique within the clip).
        pts_ns: timestamp of each frame ``(T,)``.
        face: SyncNet v2 face crops ``(T, 224, 224, 3)`` RGB uint8 (only when asked for).
        face112: grey 112×112 centre crops of the face ``(T, 112, 112)`` uint8 (SyncNet-lite).
        lips: normalised lip points ``(T, 40, 2)`` float32.
        observed: whether the face was seen in each frame ``(T,)``.
        box: the track's median box ``[x0, y0, x1, y1]``, source pixels.
        aligned: ArcFace-aligned identity crops ``(T, 112, 112, 3)`` RGB uint8 (only when
            asked for).
    """

    track_id: int
    pts_ns: npt.NDArray[np.int64]
    face: npt.NDArray[np.uint8] | None
    face112: npt.NDArray[np.uint8]
    lips: npt.NDArray[np.float32]
    observed: npt.NDArray[np.bool_]
    box: list[float]
    aligned: npt.NDArray[np.uint8] | None = None


@dataclass
class ClipFeatures:
    """Everything the sync models need from one clip.

    Attributes:
        source: the path or URL.
        video_frames: pictures on the 25 fps grid.
        video_size: ``[width, height]``.
        mfcc: MFCC frames ``(N, 13)`` float32 of the longest continuous audio run.
        mfcc_start_ns: start of the first MFCC frame's analysis window.
        mfcc_preset: the preset used.
        tracks: the face tracks.
        audio: the 16 kHz mono samples of the longest continuous audio run (only when asked
            for), starting at ``audio_start_ns``.
    """

    source: str
    video_frames: int = 0
    video_size: list[int] = field(default_factory=list)
    mfcc: npt.NDArray[np.float32] = field(
        default_factory=lambda: np.zeros((0, 13), dtype=np.float32)
    )
    mfcc_start_ns: int = 0
    mfcc_preset: str = "hamming"
    tracks: list[TrackFeatures] = field(default_factory=list)
    audio: npt.NDArray[np.int16] = field(default_factory=lambda: np.zeros(0, dtype=np.int16))
    audio_start_ns: int = 0


class _Collector:
    def __init__(self, want_face: bool, want_aligned: bool, want_audio: bool) -> None:
        self.want_face = want_face
        self.want_aligned = want_aligned
        self.want_audio = want_audio
        self.crops: dict[int, list[FaceCrops]] = {}
        self.tracks: list[TrackFeatures] = []
        self.runs: list[list[MfccBlock]] = []
        self.audio_runs: list[list[Frame]] = []

    def add(self, item: object, features: ClipFeatures) -> None:
        if isinstance(item, FaceCrops):
            self.crops.setdefault(item.track_id, []).append(item)
        elif isinstance(item, TrackEnded):
            self._close(item)
        elif isinstance(item, MfccBlock):
            if self.runs and self._continues(self.runs[-1][-1], item):
                self.runs[-1].append(item)
            else:
                self.runs.append([item])
        elif isinstance(item, Frame) and item.kind is FrameKind.VIDEO:
            features.video_frames += 1
            features.video_size = [int(item.data.shape[1]), int(item.data.shape[0])]

    def add_audio(self, frame: Frame) -> None:
        if self.audio_runs:
            last = self.audio_runs[-1][-1]
            if abs(frame.pts_ns - (last.pts_ns + last.duration_ns)) < 1_000_000:
                self.audio_runs[-1].append(frame)
                return
        self.audio_runs.append([frame])

    @staticmethod
    def _continues(last: MfccBlock, block: MfccBlock) -> bool:
        return block.pts_ns == last.pts_ns + len(last.features) * last.hop_ns

    def _close(self, ended: TrackEnded) -> None:
        crops = self.crops.pop(ended.track_id, [])
        if not crops:
            return
        self.tracks.append(
            TrackFeatures(
                track_id=ended.track_id,
                pts_ns=np.array([c.pts_ns for c in crops], dtype=np.int64),
                face=np.stack([c.face for c in crops]) if self.want_face else None,
                face112=np.stack([c.face112 for c in crops]),
                lips=np.stack([c.lips for c in crops]),
                observed=np.array([c.observed for c in crops], dtype=np.bool_),
                box=[round(float(v), 1) for v in ended.box],
                aligned=np.stack([c.aligned for c in crops]) if self.want_aligned else None,
            )
        )

    def finish(self, features: ClipFeatures) -> None:
        for track_id, crops in list(self.crops.items()):  # cut short: close what is open
            box = median_box([c.box for c in crops])
            self._close(TrackEnded(crops[0].stream_id, track_id, crops[-1].pts_ns, box, len(crops)))
        features.tracks = sorted(self.tracks, key=lambda t: t.track_id)
        if self.runs:
            longest = max(self.runs, key=lambda run: sum(len(b.features) for b in run))
            features.mfcc = np.concatenate([b.features for b in longest]).astype(np.float32)
            features.mfcc_start_ns = longest[0].pts_ns
        if self.audio_runs:
            run = max(self.audio_runs, key=lambda frames: sum(len(f.data) for f in frames))
            features.audio = np.concatenate([f.data for f in run]).astype(np.int16)
            features.audio_start_ns = run[0].pts_ns


class _AudioTap:
    """Hands each audio frame to the collector on its way to the MFCC stage."""

    name = "audio-tap"

    def __init__(self, collector: _Collector) -> None:
        self.collector = collector

    async def run(self, src: AsyncIterator[Frame]) -> AsyncIterator[Frame]:
        async for frame in src:
            if frame.kind is FrameKind.AUDIO:
                self.collector.add_audio(frame)
            yield frame


async def extract_clip(
    uri: str,
    *,
    preset: str = "hamming",
    want_face: bool = False,
    want_aligned: bool = False,
    want_audio: bool = False,
    face_config: FaceConfig | None = None,
    max_seconds: float | None = None,
    require_audio: bool = True,
) -> ClipFeatures:
    """Decode ``uri`` once and collect per-track crops and the MFCC.

    Args:
        uri: path, URL or ``device:`` URI.
        preset: MFCC preset (``hamming`` for SyncNet-lite, ``syncnet`` for SyncNet v2).
        want_face: also keep the 224×224 face crops (SyncNet v2; 150 kB a frame).
        want_aligned: also keep the 112×112 identity crops (37 kB a frame).
        want_audio: also keep the 16 kHz samples (identity's voice features).
        face_config: tracker and crop settings (offline default: syncnet_python's 13-frame
            median, i.e. a look-ahead of 6 frames).
        max_seconds: stop after this much video.
        require_audio: raise :class:`~engine.core.errors.MissingStream` for a clip with no audio.

    Raises:
        EngineError: the source cannot be opened or decoded.
    """
    from engine.vision.crops import SYNC_SMOOTH_LAG_FRAMES, CropConfig

    config = face_config or FaceConfig(crops=CropConfig(smooth_lag_frames=SYNC_SMOOTH_LAG_FRAMES))
    features = ClipFeatures(source=uri, mfcc_preset=preset)
    collector = _Collector(want_face, want_aligned, want_audio)
    source = open_source(uri, require_audio=require_audio, require_video=True)
    stages: list[Any] = [MfccStage(preset), FaceStage(config)]
    if want_audio:
        stages.insert(0, _AudioTap(collector))
    async with source, Pipeline[Any](source, stages, capacity=32) as pipe:
        async for item in pipe.outputs():
            collector.add(item, features)
            if max_seconds is not None and features.video_frames >= max_seconds * 25:
                break
    collector.finish(features)
    if features.video_frames == 0:
        raise InputError(f"{uri}: no video frames decoded")
    return features
