"""The one immutable frame type that flows through every pipeline.

Time is an integer number of nanoseconds (``pts_ns``) on the source's own media clock: never
``None``, never float seconds. Conversion to other time bases happens only at the edges.

Payload layouts, by kind:

- ``AUDIO``: ``(samples,)`` int16 mono PCM at ``sample_rate_hz`` (16 kHz after normalisation).
- ``VIDEO``: ``(height, width, 3)`` uint8 RGB.
- ``GAP``: an empty array; ``meta["dropped"]`` counts the frames a channel dropped here and
  ``meta["first_pts_ns"]``/``meta["last_pts_ns"]`` bound them, so that a consumer of audio
  learns that samples are missing instead of losing them silently.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt

NS_PER_S = 1_000_000_000

_EMPTY_META: Mapping[str, Any] = MappingProxyType({})


class FrameKind(enum.Enum):
    """What a frame's payload holds."""

    AUDIO = "audio"
    VIDEO = "video"
    GAP = "gap"


@dataclass(frozen=True, slots=True)
class Frame:
    """One timestamped unit of media.

    The payload array is made read-only on construction, so a frame can be shared between
    stages and threads without copies.

    Attributes:
        pts_ns: presentation time of the first sample (audio) or of the picture (video), in ns.
        seq: position of this frame in its stream and kind, from 0, without holes.
        stream_id: the source this frame came from.
        kind: what ``data`` holds.
        data: the payload; see the module docstring for its layout.
        sample_rate_hz: audio sample rate; 0 for video and gaps.
        meta: read-only extras (``src_pts_ns`` of a video frame picked onto the 25 fps grid, ...).
    """

    pts_ns: int
    seq: int
    stream_id: str
    kind: FrameKind
    data: npt.NDArray[Any]
    sample_rate_hz: int = 0
    meta: Mapping[str, Any] = field(default_factory=lambda: _EMPTY_META)

    def __post_init__(self) -> None:
        """Check types and freeze the payload."""
        if type(self.pts_ns) is not int:
            raise TypeError(f"pts_ns must be an int of nanoseconds, got {type(self.pts_ns)!r}")
        if self.kind is FrameKind.AUDIO and self.sample_rate_hz <= 0:
            raise ValueError("an audio frame needs a positive sample_rate_hz")
        if self.data.flags.writeable:
            self.data.flags.writeable = False
        if not isinstance(self.meta, MappingProxyType):
            object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))

    @property
    def duration_ns(self) -> int:
        """Length of an audio frame in ns (0 for other kinds)."""
        if self.kind is not FrameKind.AUDIO:
            return 0
        return len(self.data) * NS_PER_S // self.sample_rate_hz

    @property
    def end_pts_ns(self) -> int:
        """``pts_ns`` plus the duration: where the next contiguous audio frame starts."""
        return self.pts_ns + self.duration_ns


def audio_frame(
    samples: npt.NDArray[np.int16], *, pts_ns: int, seq: int, stream_id: str, sample_rate_hz: int
) -> Frame:
    """Build an audio frame of int16 mono samples."""
    return Frame(
        pts_ns=pts_ns,
        seq=seq,
        stream_id=stream_id,
        kind=FrameKind.AUDIO,
        data=samples,
        sample_rate_hz=sample_rate_hz,
    )


def video_frame(
    rgb: npt.NDArray[np.uint8], *, pts_ns: int, seq: int, stream_id: str, src_pts_ns: int
) -> Frame:
    """Build a video frame of ``(height, width, 3)`` RGB pixels."""
    return Frame(
        pts_ns=pts_ns,
        seq=seq,
        stream_id=stream_id,
        kind=FrameKind.VIDEO,
        data=rgb,
        meta={"src_pts_ns": src_pts_ns},
    )


def merge_gap(marker: Frame | None, dropped: Frame) -> Frame:
    """Fold one dropped frame into a ``GAP`` marker (the channel's ``on_gap`` hook for frames).

    Args:
        marker: the gap marker already waiting at the head of the channel, or None.
        dropped: the frame the channel is dropping now.

    Returns:
        A new ``GAP`` frame that covers both.
    """
    if marker is None:
        count, first_pts_ns = 0, dropped.pts_ns
    else:
        count, first_pts_ns = int(marker.meta["dropped"]), int(marker.meta["first_pts_ns"])
    return Frame(
        pts_ns=first_pts_ns,
        seq=dropped.seq,
        stream_id=dropped.stream_id,
        kind=FrameKind.GAP,
        data=np.empty(0, dtype=np.uint8),
        meta={
            "dropped": count + 1,
            "dropped_kind": dropped.kind.value,
            "first_pts_ns": first_pts_ns,
            "last_pts_ns": dropped.pts_ns,
            "end_pts_ns": dropped.end_pts_ns,
        },
    )
