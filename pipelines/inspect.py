"""Offline inspection: decode a source through the engine's front-end and summarise it.

Source -> (audio: 16 kHz mono -> streaming MFCC; video: 25 fps grid) -> a report of what came
out and how fast. It exercises the same source and DSP code the live engine runs.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from engine.core.frame import Frame, FrameKind
from engine.core.stage import Pipeline, ProcessorStage, Stage
from engine.dsp.stage import MfccBlock, MfccStage
from engine.sources import SourceStateChange, open_source


@dataclass
class InspectReport:
    """What the front-end produced for one source."""

    source: str
    stream_id: str
    video_frames: int = 0
    video_size: list[int] = field(default_factory=list)
    video_seconds: float = 0.0
    audio_seconds: float = 0.0
    audio_rms_dbfs: float = float("-inf")
    mfcc_frames: int = 0
    mfcc_preset: str = "syncnet"
    mfcc_mean: list[float] = field(default_factory=list)
    states: list[str] = field(default_factory=list)
    seconds: float = 0.0
    realtime_factor: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (infinite levels become None)."""
        data = asdict(self)
        if not np.isfinite(self.audio_rms_dbfs):
            data["audio_rms_dbfs"] = None
        return data


async def inspect_source(
    uri: str, *, preset: str = "syncnet", paced: bool = False, max_seconds: float | None = None
) -> InspectReport:
    """Run one source through the front-end and report.

    Args:
        uri: path, URL or ``device:`` URI.
        preset: MFCC preset.
        paced: read a file at real time instead of as fast as possible.
        max_seconds: stop after this much media time (live sources never end by themselves).

    Raises:
        EngineError: the source cannot be opened or fails.
    """
    report = InspectReport(source=uri, stream_id="", mfcc_preset=preset)

    def on_state(change: SourceStateChange) -> None:
        report.states.append(change.state.value)

    started = time.perf_counter()
    source = open_source(uri, paced=paced, on_state=on_state)
    report.stream_id = source.stream_id
    tally = _Tally()
    meter = ProcessorStage(tally.meter, name="level")
    async with source:
        stages: list[Stage[Any, Any]] = [meter, MfccStage(preset)]
        async with Pipeline[MfccBlock | Frame](source, stages, capacity=32) as pipe:
            async for item in pipe.outputs():
                tally.add(item)
                if max_seconds is not None and tally.media_seconds() >= max_seconds:
                    break
    report.seconds = time.perf_counter() - started
    tally.fill(report)
    return report


class _Tally:
    """Running sums over the pipeline's outputs."""

    def __init__(self) -> None:
        self.video_frames = 0
        self.video_size: list[int] = []
        self.first_video_ns: int | None = None
        self.last_video_ns = 0
        self.mfcc_frames = 0
        self.mfcc_sum: np.ndarray[Any, np.dtype[np.float64]] | None = None
        self.audio_samples = 0
        self.audio_energy = 0.0

    async def meter(self, frame: Frame) -> Frame:
        if frame.kind is FrameKind.AUDIO:
            samples = frame.data.astype(np.float64)
            self.audio_samples += samples.size
            self.audio_energy += float(np.dot(samples, samples))
        return frame

    def add(self, item: MfccBlock | Frame) -> None:
        if isinstance(item, Frame):
            if item.kind is FrameKind.VIDEO:
                self.video_frames += 1
                self.video_size = [int(item.data.shape[1]), int(item.data.shape[0])]
                if self.first_video_ns is None:
                    self.first_video_ns = item.pts_ns
                self.last_video_ns = item.pts_ns
            return
        self.mfcc_frames += len(item.features)
        total = item.features.sum(axis=0)
        self.mfcc_sum = total if self.mfcc_sum is None else self.mfcc_sum + total

    def media_seconds(self) -> float:
        return max(self.video_frames / 25.0, self.mfcc_frames / 100.0)

    def fill(self, report: InspectReport) -> None:
        report.video_frames = self.video_frames
        report.video_size = self.video_size
        report.video_seconds = self.video_frames / 25.0
        report.audio_seconds = self.mfcc_frames / 100.0
        report.mfcc_frames = self.mfcc_frames
        if self.mfcc_sum is not None and self.mfcc_frames:
            mean = self.mfcc_sum / self.mfcc_frames
            report.mfcc_mean = [round(float(x), 3) for x in mean]
        if self.audio_samples:
            mean_square = self.audio_energy / self.audio_samples / 32768.0**2
            report.audio_rms_dbfs = round(float(10 * np.log10(max(mean_square, 1e-20))), 1)
        media = max(report.video_seconds, report.audio_seconds)
        report.realtime_factor = round(media / report.seconds, 1) if report.seconds else 0.0
        report.seconds = round(report.seconds, 3)
