"""Normalisation of decoded media: audio to 16 kHz mono int16, video to 25 fps by timestamp.

Both classes are synchronous and hold no threads; a demuxer thread drives them.

- :class:`AudioNormalizer` resamples with PyAV's resampler (libswresample) and stamps chunks
  from a running sample count anchored on the first decoded timestamp, so ``pts_ns`` never
  jitters; a jump in the input timestamps larger than ``resync_ns`` re-anchors (live streams).
- :class:`VideoGrid` picks, for every slot of a 25 fps grid, the decoded picture whose timestamp
  is nearest (duplicating or dropping pictures as the input rate requires) and keeps the picture's
  real timestamp as ``meta["src_pts_ns"]``. A hole of more than ``max_hold_ns`` between pictures
  (an outage) is left empty rather than filled with a stale picture.
"""

from __future__ import annotations

from dataclasses import dataclass

import av
import numpy as np
import numpy.typing as npt

from engine.core.frame import NS_PER_S, Frame, audio_frame, video_frame

TARGET_RATE_HZ = 16_000
TARGET_FPS = 25
FRAME_NS = NS_PER_S // TARGET_FPS


def pts_to_ns(pts: int | None, time_base: float | None) -> int | None:
    """Media timestamp to integer ns (None stays None)."""
    if pts is None or time_base is None:
        return None
    return int(round(pts * time_base * NS_PER_S))


@dataclass
class NormalizerStats:
    """What normalisation did to the input, for reports."""

    audio_resyncs: int = 0
    video_in: int = 0
    video_out: int = 0
    video_late: int = 0
    video_gaps: int = 0


class AudioNormalizer:
    """Decoded audio frames of any layout and rate in, 16 kHz mono int16 :class:`Frame` s out."""

    def __init__(
        self, stream_id: str, *, rate_hz: int = TARGET_RATE_HZ, resync_ns: int = NS_PER_S // 5
    ) -> None:
        """Start with no anchor; the first decoded frame sets it."""
        self.stream_id = stream_id
        self.rate_hz = rate_hz
        self.resync_ns = resync_ns
        self.stats = NormalizerStats()
        self._resampler = self._new_resampler()
        self._anchor_ns: int | None = None
        self._samples = 0
        self._seq = 0

    @property
    def next_pts_ns(self) -> int | None:
        """Where the next chunk will start, or None before the first one."""
        if self._anchor_ns is None:
            return None
        return self._anchor_ns + self._samples * NS_PER_S // self.rate_hz

    def push(self, frame: av.AudioFrame | None, pts_ns: int | None, base_ns: int) -> list[Frame]:
        """Resample one decoded frame (None flushes the resampler at the end).

        Args:
            frame: decoded audio, or None at end of stream.
            pts_ns: its timestamp in ns on the source timeline, if known.
            base_ns: offset added to every timestamp (loops, reconnects).
        """
        expected = self.next_pts_ns
        if pts_ns is not None:
            stamped = pts_ns + base_ns
            if expected is None or abs(stamped - expected) > self.resync_ns:
                if expected is not None:
                    self.stats.audio_resyncs += 1
                self._anchor_ns, self._samples = stamped, 0
        elif expected is None:
            self._anchor_ns, self._samples = base_ns, 0
        out = []
        for resampled in self._resampler.resample(frame):
            samples = resampled.to_ndarray().reshape(-1).astype(np.int16, copy=False)
            if samples.size == 0:
                continue
            out.append(self._stamp(samples))
        if frame is None:  # a flushed resampler cannot be reused (next loop or reconnect)
            self._resampler = self._new_resampler()
        return out

    def _new_resampler(self) -> av.AudioResampler:
        return av.AudioResampler(format="s16", layout="mono", rate=self.rate_hz)

    def _stamp(self, samples: npt.NDArray[np.int16]) -> Frame:
        anchor = self._anchor_ns if self._anchor_ns is not None else 0
        chunk = audio_frame(
            samples,
            pts_ns=anchor + self._samples * NS_PER_S // self.rate_hz,
            seq=self._seq,
            stream_id=self.stream_id,
            sample_rate_hz=self.rate_hz,
        )
        self._samples += samples.size
        self._seq += 1
        return chunk


class VideoGrid:
    """Pictures at any rate in, pictures on a 25 fps grid of the source timeline out.

    Slot ``n`` is at ``n * 40 ms`` of the source timeline (plus the base offset), so every stream's
    grid lines up with its audio: one slot spans exactly 4 MFCC hops of 10 ms. A slot takes the
    picture whose timestamp is nearest to it.
    """

    def __init__(
        self, stream_id: str, *, fps: int = TARGET_FPS, max_hold_ns: int = NS_PER_S // 2
    ) -> None:
        """Start with no picture held; a picture is repeated over at most ``max_hold_ns``."""
        self.stream_id = stream_id
        self.max_hold_ns = max_hold_ns
        self.frame_ns = NS_PER_S // fps
        self.stats = NormalizerStats()
        self._held: tuple[int, npt.NDArray[np.uint8]] | None = None
        self._last_interval_ns = self.frame_ns
        self._next_slot: int | None = None
        self._seq = 0
        self.last_slot_ns: int | None = None
        """Timestamp of the last slot emitted, for continuing the grid after a loop."""

    def push(self, rgb: npt.NDArray[np.uint8], pts_ns: int) -> list[Frame]:
        """Add one decoded picture with its timestamp (ns, base offset included)."""
        self.stats.video_in += 1
        if self._held is None:
            self._held = (pts_ns, rgb)
            self._next_slot = -(-(pts_ns - self.frame_ns // 2) // self.frame_ns)
            return []
        held_pts, _ = self._held
        if pts_ns <= held_pts:
            self.stats.video_late += 1
            return []
        if pts_ns - held_pts > self.max_hold_ns:  # a gap (outage, reconnect): don't fill it
            self.stats.video_gaps += 1
            out = self.finish()
            return out + self.push(rgb, pts_ns)
        self._last_interval_ns = pts_ns - held_pts
        out = self._emit_until((held_pts + pts_ns) // 2)
        self._held = (pts_ns, rgb)
        return out

    def finish(self) -> list[Frame]:
        """Emit the slots the last picture still covers, then forget it."""
        if self._held is None:
            return []
        held_pts, _ = self._held
        out = self._emit_until(held_pts + self._last_interval_ns // 2)
        if not out and self._seq == 0:
            out = self._emit_until(held_pts + self.frame_ns)
        self._held = None
        self._next_slot = None
        return out

    def _emit_until(self, limit_ns: int) -> list[Frame]:
        """Emit every slot whose time is before ``limit_ns`` with the held picture."""
        assert self._held is not None and self._next_slot is not None
        held_pts, rgb = self._held
        out = []
        while self._next_slot * self.frame_ns < limit_ns:
            out.append(
                video_frame(
                    rgb,
                    pts_ns=self._next_slot * self.frame_ns,
                    seq=self._seq,
                    stream_id=self.stream_id,
                    src_pts_ns=held_pts,
                )
            )
            self._seq += 1
            self._next_slot += 1
        if out:
            self.last_slot_ns = out[-1].pts_ns
        self.stats.video_out += len(out)
        return out
