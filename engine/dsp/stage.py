"""The audio front-end as a pipeline stage: audio frames in, timestamped MFCC blocks out.

Video frames pass through untouched, so the stage can sit on a mixed audio/video stream.

Cost per call: one audio chunk of 20-40 ms is 2-4 MFCC frames, a few microseconds of Numba
(see ``benchmarks/dsp.py``), so the stage runs inline on the event loop rather than paying an
executor hop per chunk.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from engine.core.frame import NS_PER_S, Frame, FrameKind
from engine.dsp.mfcc import MfccPreset, StreamingMfcc


@dataclass(frozen=True)
class MfccBlock:
    """Consecutive MFCC frames of one stream.

    Attributes:
        stream_id: the source.
        pts_ns: start time of the first frame's analysis window.
        hop_ns: time between frames (10 ms).
        first_index: index of the first frame since the segment began.
        features: ``(frames, n_ceps)`` float64.
    """

    stream_id: str
    pts_ns: int
    hop_ns: int
    first_index: int
    features: npt.NDArray[np.float64]


class MfccStage:
    """Streaming MFCC per stream, restarted cleanly at gaps and timestamp jumps.

    A discontinuity (a ``GAP`` frame, or audio whose ``pts_ns`` is not where the previous chunk
    ended) ends the current segment: its zero-padded tail is emitted, then a new segment starts at
    the new timestamp, so every emitted frame's ``pts_ns`` is true.

    Args:
        preset: MFCC preset name or object.
        sample_rate_hz: rate of the incoming audio.
    """

    name = "mfcc"

    def __init__(self, preset: str | MfccPreset = "syncnet", sample_rate_hz: int = 16_000) -> None:
        """See the class docstring."""
        self.preset = preset
        self.sample_rate_hz = sample_rate_hz
        self._streams: dict[str, _Segment] = {}

    async def run(self, src: AsyncIterator[Frame]) -> AsyncIterator[MfccBlock | Frame]:
        """Turn audio into MFCC blocks; pass video frames through."""
        async for frame in src:
            if frame.kind is FrameKind.VIDEO:
                yield frame
                continue
            for block in self.push(frame):
                yield block
        for block in self.finish():
            yield block

    def push(self, frame: Frame) -> list[MfccBlock]:
        """Feed one audio or gap frame; return the blocks it completed."""
        segment = self._streams.get(frame.stream_id)
        out: list[MfccBlock] = []
        if frame.kind is FrameKind.GAP:
            if segment is not None:
                out.extend(segment.finish())
                del self._streams[frame.stream_id]
            return out
        if segment is not None and abs(frame.pts_ns - segment.next_pts_ns) > segment.sample_ns:
            out.extend(segment.finish())
            segment = None
        if segment is None:
            segment = _Segment(
                frame.stream_id, frame.pts_ns, StreamingMfcc(self.preset, self.sample_rate_hz)
            )
            self._streams[frame.stream_id] = segment
        out.extend(segment.push(frame.data))
        return out

    def finish(self) -> list[MfccBlock]:
        """End every stream: emit the zero-padded tails."""
        out = [block for segment in self._streams.values() for block in segment.finish()]
        self._streams.clear()
        return out


class _Segment:
    """One contiguous run of audio of one stream."""

    def __init__(self, stream_id: str, start_ns: int, mfcc: StreamingMfcc) -> None:
        self.stream_id = stream_id
        self.start_ns = start_ns
        self.mfcc = mfcc
        self.rate_hz = mfcc.preset.stft.sample_rate_hz
        self.sample_ns = NS_PER_S // self.rate_hz
        self.samples = 0

    @property
    def next_pts_ns(self) -> int:
        return self.start_ns + self.samples * NS_PER_S // self.rate_hz

    def push(self, samples: npt.NDArray[np.int16]) -> list[MfccBlock]:
        first = self.mfcc.frames_out
        self.samples += samples.size
        return self._block(first, self.mfcc.push(samples))

    def finish(self) -> list[MfccBlock]:
        return self._block(self.mfcc.frames_out, self.mfcc.flush())

    def _block(self, first: int, features: npt.NDArray[np.float64]) -> list[MfccBlock]:
        if not len(features):
            return []
        hop_ns = self.mfcc.hop_length * NS_PER_S // self.rate_hz
        return [
            MfccBlock(
                stream_id=self.stream_id,
                pts_ns=self.start_ns + first * self.mfcc.hop_length * NS_PER_S // self.rate_hz,
                hop_ns=hop_ns,
                first_index=first,
                features=features,
            )
        ]
