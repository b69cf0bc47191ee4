"""Blocking PyAV demux/decode of one container, translated to engine frames and errors.

A :class:`Demuxer` is driven from one dedicated thread (see :mod:`engine.sources.base`). It
never raises PyAV's exceptions: opening and decoding failures become :class:`InputError` or
:class:`SourceUnavailable` with a message naming the source.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import av
import av.container
import numpy as np
import numpy.typing as npt

from engine.core.errors import CorruptMedia, EngineError, MissingStream, SourceUnavailable
from engine.core.frame import Frame
from engine.sources.normalize import AudioNormalizer, VideoGrid, pts_to_ns

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_DECODE_ERRORS = 25


@dataclass(frozen=True)
class OpenSpec:
    """How to open one container with PyAV.

    Attributes:
        target: path, URL or device name, as FFmpeg takes it.
        label: how errors name it (no secrets: URLs lose their user info).
        format: forced demuxer / capture format (``alsa``, ``lavfi``, ...), or None to probe.
        options: FFmpeg options for the demuxer and protocol.
        open_timeout_s: how long opening may take.
        read_timeout_s: how long one read may block before the source counts as stalled.
        want_audio: decode audio if the container has it.
        want_video: decode video if the container has it.
    """

    target: str
    label: str
    format: str | None = None
    options: Mapping[str, str] = field(default_factory=dict)
    open_timeout_s: float = 10.0
    read_timeout_s: float = 10.0
    want_audio: bool = True
    want_video: bool = True


@dataclass
class DemuxStats:
    """Counters of one demuxer over its life (all passes and reconnects)."""

    packets: int = 0
    decode_errors: int = 0
    audio_frames: int = 0
    video_frames: int = 0


class Demuxer:
    """One open container: yields normalised frames until the end of the media.

    Args:
        spec: what to open.
        stream_id: stamped on every frame.
    """

    def __init__(self, spec: OpenSpec, stream_id: str, *, low_delay: bool = False) -> None:
        """Open the container (blocking) and pick its first audio and video streams.

        ``low_delay``: decode video with slice threads rather than frame threads. Frame threads
        decode fastest in bulk but hold a frame per thread; a real-time source wants each
        picture as soon as it is due, and several of them sharing a few cores lose more to
        the extra threads than they gain (four paced streams on two cores: p95 latency about
        0.6 s with slices against 0.8-1.0 s with frames).

        Raises:
            EngineError: the container cannot be opened, or has none of the wanted streams.
        """
        self.spec = spec
        self.stream_id = stream_id
        self.stats = DemuxStats()
        self._container = _open(spec)
        self._audio = _first(self._container, "audio") if spec.want_audio else None
        self._video = _first(self._container, "video") if spec.want_video else None
        if isinstance(self._video, av.video.stream.VideoStream):
            self._video.thread_type = "SLICE" if low_delay else "AUTO"
        if self._audio is None and self._video is None:
            self.close()
            raise MissingStream(f"{spec.label}: no audio or video stream in the media")
        start = self._container.start_time
        self.origin_ns = int(start) * 1000 if start is not None else 0

    @property
    def has_audio(self) -> bool:
        """True when an audio stream is decoded."""
        return self._audio is not None

    @property
    def has_video(self) -> bool:
        """True when a video stream is decoded."""
        return self._video is not None

    def close(self) -> None:
        """Close the container. Idempotent."""
        try:
            self._container.close()
        except (av.error.FFmpegError, OSError):  # closing a broken stream must not raise
            log.debug("closing %s failed", self.spec.label, exc_info=True)

    def frames(
        self, audio: AudioNormalizer | None, video: VideoGrid | None, base_ns: int
    ) -> Iterator[Frame]:
        """Decode to the end, yielding normalised frames (blocking; run it in a thread).

        Args:
            audio: the stream's audio normaliser (None skips audio).
            video: the stream's 25 fps grid (None skips video).
            base_ns: added to every timestamp after the container origin is removed.

        Raises:
            CorruptMedia: decoding failed too many times in a row, or the container broke.
            SourceUnavailable: a network or device read failed (timeout, connection reset).
        """
        streams = [s for s in (self._audio if audio else None, self._video if video else None) if s]
        consecutive = 0
        try:
            for packet in self._container.demux(streams):
                self.stats.packets += 1
                try:
                    decoded = packet.decode()
                    consecutive = 0
                except av.error.EOFError:  # the decoder was already flushed: nothing more
                    continue
                except av.error.InvalidDataError:
                    self.stats.decode_errors += 1
                    consecutive += 1
                    if consecutive > MAX_CONSECUTIVE_DECODE_ERRORS:
                        raise CorruptMedia(
                            f"{self.spec.label}: {consecutive} packets in a row failed to decode"
                        ) from None
                    continue
                for item in decoded:
                    if isinstance(item, av.AudioFrame | av.VideoFrame):
                        yield from self._normalise(item, audio, video, base_ns)
        except av.error.FFmpegError as error:
            raise _translate(error, self.spec.label, reading=True) from None
        if audio is not None:
            yield from audio.push(None, None, base_ns)
        if video is not None:
            yield from video.finish()

    def _normalise(
        self,
        item: av.AudioFrame | av.VideoFrame,
        audio: AudioNormalizer | None,
        video: VideoGrid | None,
        base_ns: int,
    ) -> Iterator[Frame]:
        pts_ns = pts_to_ns(item.pts, float(item.time_base) if item.time_base else None)
        rel_ns = None if pts_ns is None else pts_ns - self.origin_ns
        if isinstance(item, av.AudioFrame) and audio is not None:
            self.stats.audio_frames += 1
            yield from audio.push(item, rel_ns, base_ns)
        elif isinstance(item, av.VideoFrame) and video is not None:
            self.stats.video_frames += 1
            if rel_ns is None:
                rel_ns = self.stats.video_frames * video.frame_ns
            rgb: npt.NDArray[np.uint8] = np.ascontiguousarray(item.to_ndarray(format="rgb24"))
            yield from video.push(rgb, rel_ns + base_ns)


def _first(
    container: av.container.InputContainer, kind: str
) -> av.audio.stream.AudioStream | av.video.stream.VideoStream | None:
    streams = container.streams.audio if kind == "audio" else container.streams.video
    if not streams:
        return None
    return streams[0]


def _open(spec: OpenSpec) -> av.container.InputContainer:
    try:
        return av.open(
            spec.target,
            mode="r",
            format=spec.format,
            options=dict(spec.options),
            timeout=(spec.open_timeout_s, spec.read_timeout_s),
        )
    except (av.error.FFmpegError, OSError) as error:
        raise _translate(error, spec.label, reading=False) from None


_UNAVAILABLE_ERRNOS = {
    errno.ECONNREFUSED,
    errno.ETIMEDOUT,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.ECONNRESET,
    errno.EIO,
    errno.EAGAIN,
    errno.EBUSY,
}


def _translate(error: Exception, label: str, *, reading: bool) -> EngineError:
    """Turn a PyAV/OS error into one of ours, with a message that names the source."""
    what = "reading" if reading else "opening"
    reason = getattr(error, "strerror", None) or str(error)
    code = getattr(error, "errno", None)
    if isinstance(error, av.error.InvalidDataError):
        return CorruptMedia(f"{label}: not decodable media ({reason})")
    if isinstance(error, av.error.ExitError):  # PyAV's open/read timeout interrupted FFmpeg
        return SourceUnavailable(f"{label}: timed out while {what}")
    if isinstance(error, av.error.EOFError):
        return CorruptMedia(f"{label}: the media ends abruptly while {what} ({reason})")
    if code in _UNAVAILABLE_ERRNOS or isinstance(error, TimeoutError):
        return SourceUnavailable(f"{label}: unreachable while {what} ({reason})")
    if isinstance(error, av.error.HTTPError) or code in {errno.ENOENT, errno.EACCES}:
        return SourceUnavailable(f"{label}: {reason}", retryable=False)
    return CorruptMedia(f"{label}: failed while {what} ({reason})")
