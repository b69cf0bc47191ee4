"""A WebRTC peer as a source: aiortc's received tracks in, 16 kHz audio and 25 fps video out.

A publisher (a browser or ``talkscope publish``) sends audio and video as RTP. aiortc decodes
them and gives each decoded frame a ``pts`` that counts RTP clock ticks from the track's own
first frame: audio and video start at 0 independently, so that ``pts`` alone says nothing about
lip sync. The sender's RTCP sender reports (SR) tie each track's RTP clock to one wall clock
(NTP), which is how a WebRTC receiver lines audio up with video (RFC 3550 section 6.4.1, and
what browsers do). :class:`RtpTimeline` applies the latest SR of its track, so both tracks'
frames land on the sender's clock; a stream's ``pts_ns`` then counts from the first frame::

    decoded frame --RTP ticks--> RtpTimeline --sender ns--> minus stream base --> normalizers

Frames wait (at most ``sync_timeout_s``) until every track has had its first SR. A sender that
never sends one falls back to arrival time, and this is logged, since lip sync is then only as
good as the two tracks' network and decode delays are equal.

Like every source, it yields :class:`~engine.core.frame.Frame` s through a bounded channel:
video is dropped (counted) when the consumer lags, audio never.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import av
import numpy as np
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCRtpReceiver
from aiortc.mediastreams import MediaStreamError
from aiortc.rtp import RtcpSrPacket

from engine.core.channel import Channel, FullPolicy
from engine.core.errors import ChannelClosed, SourceUnavailable
from engine.core.frame import Frame
from engine.sources.base import SourceState, SourceStateChange, SourceStats, StateCallback
from engine.sources.normalize import AudioNormalizer, VideoGrid

log = logging.getLogger(__name__)

NS_PER_S = 1_000_000_000
RTP_WRAP = 1 << 32
SYNC_TIMEOUT_S = 3.0
"""How long frames wait for the sender reports that line audio up with video."""
CLOSE_TIMEOUT_S = 5.0
IDLE_TIMEOUT_S = 10.0
NTP_TO_UNIX_NS = 2_208_988_800 * NS_PER_S
"""NTP counts from 1900, Unix from 1970."""


def ntp_to_ns(ntp: int) -> int:
    """A 64-bit NTP timestamp (32.32 fixed point seconds since 1900) to integer ns."""
    return (ntp >> 32) * NS_PER_S + ((ntp & 0xFFFFFFFF) * NS_PER_S >> 32)


def unwrap_near(timestamp: int, reference: int) -> int:
    """The value congruent to a 32-bit RTP ``timestamp`` that is nearest to ``reference``."""
    base = reference - RTP_WRAP // 2
    return base + (timestamp - base) % RTP_WRAP


class RtpTimeline:
    """One received track's RTP clock mapped onto the sender's wall clock by its SRs.

    Args:
        clock_rate_hz: the RTP clock rate (90 kHz video, 48 kHz Opus).

    Loop affinity: the loop that runs the peer connection.
    """

    def __init__(self, clock_rate_hz: int) -> None:
        """See the class docstring."""
        self.clock_rate_hz = clock_rate_hz
        self.origin: int | None = None
        """The RTP timestamp of aiortc's ``pts`` 0 (the track's first frame)."""
        self._report: tuple[int, int] | None = None  # (sender ns, 32-bit RTP timestamp)
        self._fallback: tuple[int, int] | None = None  # (arrival ns, pts ticks)
        self.reports = 0
        self._frozen = False

    @property
    def synced(self) -> bool:
        """True once an SR has arrived."""
        return self._report is not None

    def on_sender_report(self, ntp: int, rtp: int) -> None:
        """Record one RTCP SR of this track (ignored once frozen without one)."""
        self.reports += 1
        if not self._frozen or self._report is not None:
            self._report = (ntp_to_ns(ntp), rtp)

    def freeze(self) -> None:
        """Keep the current mapping kind: a track timed by arrival stays so (no jump later)."""
        self._frozen = True

    def sender_ns(self, pts_ticks: int, arrival_ns: int) -> int:
        """Sender wall time of a decoded frame with aiortc ``pts`` ``pts_ticks``.

        Args:
            pts_ticks: the frame's ``pts`` (RTP ticks since the track's first frame).
            arrival_ns: ``time.time_ns()`` when it was received; used only without an SR.
        """
        if self._report is not None and self.origin is not None:
            sr_ns, sr_rtp = self._report
            rtp = self.origin + pts_ticks
            ticks = rtp - unwrap_near(sr_rtp, rtp)
            return sr_ns + ticks * NS_PER_S // self.clock_rate_hz
        if self._fallback is None:
            self._fallback = (arrival_ns, pts_ticks)
        first_ns, first_ticks = self._fallback
        return first_ns + (pts_ticks - first_ticks) * NS_PER_S // self.clock_rate_hz


def watch_sender_reports(receiver: RTCRtpReceiver, timeline: RtpTimeline) -> None:
    """Feed every RTCP SR the receiver gets to ``timeline``, and learn its RTP origin.

    aiortc keeps both private: it drops the SR's RTP timestamp after its statistics and rebases
    ``pts`` on the first frame in a ``TimestampMapper``. The RTCP handler is wrapped on this
    one receiver object; the mapper's origin is read once. Both are checked by the WebRTC tests,
    and the aiortc version is pinned to the minor release they pass with.
    """
    handle = receiver._handle_rtcp_packet

    async def handle_rtcp(packet: Any) -> None:
        if isinstance(packet, RtcpSrPacket):
            info = packet.sender_info
            timeline.on_sender_report(info.ntp_timestamp, info.rtp_timestamp)
        await handle(packet)

    receiver._handle_rtcp_packet = handle_rtcp  # type: ignore[method-assign]


def _rtp_origin(receiver: RTCRtpReceiver) -> int | None:
    mapper = getattr(receiver, "_RTCRtpReceiver__timestamp_mapper", None)
    origin = getattr(mapper, "_origin", None)
    return origin if isinstance(origin, int) else None


@dataclass
class _Track:
    """One received track and the decoded frames that wait for the stream's time base."""

    track: MediaStreamTrack
    receiver: RTCRtpReceiver
    timeline: RtpTimeline
    waiting: list[tuple[av.AudioFrame | av.VideoFrame, int]] = field(default_factory=list)


class WebRtcSource:
    """The media of one WebRTC peer connection, as a source of normalised frames.

    Args:
        stream_id: stamped on every frame and state change.
        pc: the peer connection, already answered; the source closes it in :meth:`aclose`.
        tracks: the remote tracks with their receivers (from the ``track`` events).
        on_state: called at every state change (more in :attr:`listeners`).
        capacity: frames buffered for the consumer; video beyond it is dropped (counted).
        sync_timeout_s: longest wait for the first sender report of every track.
        idle_timeout_s: a peer that sends no media for this long is gone (it vanished
            without a DELETE or an RTCP BYE): the source fails instead of waiting for ICE
            consent to expire (30 s).

    Use it like any source: ``async with source: async for frame in source: ...``. It ends when
    the peer stops its tracks or the connection closes, and fails (``SourceUnavailable``) when
    ICE or DTLS fails. Loop affinity: the loop that runs ``pc``.
    """

    def __init__(
        self,
        stream_id: str,
        pc: RTCPeerConnection,
        tracks: list[tuple[MediaStreamTrack, RTCRtpReceiver]],
        *,
        on_state: StateCallback | None = None,
        capacity: int = 64,
        sync_timeout_s: float = SYNC_TIMEOUT_S,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
    ) -> None:
        """See the class docstring."""
        self.stream_id = stream_id
        self.pc = pc
        self.state = SourceState.CONNECTING
        self.stats = SourceStats()
        self.late_video_ns: int | None = None  # frames arrive in real time: nothing to pace
        self.sync_timeout_s = sync_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.listeners: list[StateCallback] = [] if on_state is None else [on_state]
        self._last_media_s = time.monotonic()
        self._channel: Channel[Frame] = Channel(
            capacity, FullPolicy.WAIT, name=f"webrtc:{stream_id}"
        )
        self._tracks = [self._watch(track, receiver) for track, receiver in tracks]
        self._audio = AudioNormalizer(stream_id)
        self._video = VideoGrid(stream_id)
        self._base_ns: int | None = None
        self._deadline = time.monotonic() + sync_timeout_s
        self._error: SourceUnavailable | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        pc.on("connectionstatechange", self._connection_changed)

    @property
    def base_ns(self) -> int | None:
        """The sender-clock time (ns since the NTP epoch, 1900) of ``pts_ns`` 0, once known.

        With an aiortc or browser sender that is its wall clock, so ``base_ns + pts_ns`` minus
        :data:`NTP_TO_UNIX_NS` is when the sender sent (captured) that media, in Unix ns.
        """
        return self._base_ns

    @staticmethod
    def _watch(track: MediaStreamTrack, receiver: RTCRtpReceiver) -> _Track:
        rate = 90_000 if track.kind == "video" else 48_000
        timeline = RtpTimeline(rate)
        watch_sender_reports(receiver, timeline)
        return _Track(track, receiver, timeline)

    # --- the source API ------------------------------------------------------------------

    async def __aenter__(self) -> WebRtcSource:
        """Start reading the tracks."""
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the peer connection and discard what is queued."""
        await self.aclose()

    async def start(self) -> None:
        """Start one reader task per track. Idempotent."""
        if self._tasks or self._closed:
            return
        if not self._tracks:
            raise SourceUnavailable(f"{self.stream_id}: the peer sends no audio or video")
        self._notify(SourceState.STARTED, f"{len(self._tracks)} track(s) over WebRTC")
        self._tasks = [
            asyncio.create_task(self._read(item), name=f"{self.stream_id}:{item.track.kind}")
            for item in self._tracks
        ]
        self._tasks.append(asyncio.create_task(self._release_when_due(), name="sync-timeout"))
        self._tasks.append(asyncio.create_task(self._watch_idle(), name="idle-timeout"))

    def __aiter__(self) -> AsyncIterator[Frame]:
        """Same as :meth:`frames`."""
        return self.frames()

    async def frames(self) -> AsyncIterator[Frame]:
        """Yield frames until the peer stops.

        Raises:
            SourceUnavailable: the connection failed.
        """
        await self.start()
        async for frame in self._channel:
            yield frame
        if self._error is not None:
            raise self._error

    async def stop(self, reason: str) -> None:
        """End the stream normally (``ended`` with ``reason``) and close the connection."""
        if self._closed or self._channel.closed:
            return
        self._notify(SourceState.ENDED, reason)
        self._channel.close()
        await self._close_pc()

    async def aclose(self) -> None:
        """Stop the readers and close the peer connection (bounded). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._channel.discard()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._close_pc()

    async def _close_pc(self) -> None:
        """Close the peer connection, waiting at most ``CLOSE_TIMEOUT_S``."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.pc.close(), CLOSE_TIMEOUT_S)

    # --- reading -------------------------------------------------------------------------

    async def _read(self, item: _Track) -> None:
        try:
            while True:
                frame = await item.track.recv()
                if not isinstance(frame, av.AudioFrame | av.VideoFrame):
                    continue  # aiortc yields decoded frames; a packet would be a bug of its
                if item.timeline.origin is None:
                    item.timeline.origin = _rtp_origin(item.receiver)
                self._last_media_s = time.monotonic()
                item.waiting.append((frame, time.time_ns()))
                if self._base_ns is not None or self._set_base():
                    await self._flush(item)
        except (MediaStreamError, ChannelClosed):
            pass  # the peer stopped this track, the connection closed, or the source stopped
        finally:
            self._track_done(item)

    def _track_done(self, item: _Track) -> None:
        self._tracks = [other for other in self._tracks if other is not item]
        if self._tracks or self._channel.closed:
            return
        if self._error is None and not self._closed:
            self._notify(SourceState.ENDED, "the peer stopped sending")
        self._channel.close()

    async def _release_when_due(self) -> None:
        """Stop waiting for sender reports after ``sync_timeout_s``."""
        await asyncio.sleep(self.sync_timeout_s)
        if self._base_ns is None and self._set_base():
            for item in list(self._tracks):
                await self._flush(item)

    async def _watch_idle(self) -> None:
        while not self._channel.closed:
            await asyncio.sleep(min(1.0, self.idle_timeout_s / 4))
            idle_s = time.monotonic() - self._last_media_s
            if idle_s > self.idle_timeout_s and not self._channel.closed:
                self._fail(f"no media for {idle_s:.0f} s: the publisher is gone")
                await self._close_pc()

    def _fail(self, message: str) -> None:
        self._error = SourceUnavailable(f"{self.stream_id}: {message}")
        self._notify(SourceState.FAILED, str(self._error))
        self._channel.close()

    async def _flush(self, item: _Track) -> None:
        """Hand on one track's waiting frames (the stream's time base is known)."""
        while item.waiting:
            frame, arrival_ns = item.waiting.pop(0)
            await self._emit(item, frame, arrival_ns)

    def _set_base(self) -> bool:
        started = [item for item in self._tracks if item.waiting]
        synced = all(item.timeline.synced for item in self._tracks)
        if not started or (not synced and time.monotonic() < self._deadline):
            return False
        for item in self._tracks:
            item.timeline.freeze()
        if not synced:
            log.warning(
                "%s: no RTCP sender report within %.1f s; lining audio up with video by arrival",
                self.stream_id,
                self.sync_timeout_s,
            )
        self._base_ns = min(
            item.timeline.sender_ns(item.waiting[0][0].pts or 0, item.waiting[0][1])
            for item in started
        )
        return True

    async def _emit(self, item: _Track, frame: av.AudioFrame | av.VideoFrame, arrival: int) -> None:
        assert self._base_ns is not None
        pts_ns = item.timeline.sender_ns(frame.pts or 0, arrival) - self._base_ns
        if isinstance(frame, av.AudioFrame):
            for chunk in self._audio.push(frame, pts_ns, 0):
                await self._channel.send(chunk)
                self.stats.audio_frames += 1
            return
        for picture in self._video.push(
            np.asarray(frame.to_ndarray(format="rgb24"), dtype=np.uint8), pts_ns
        ):
            if self._channel.send_nowait(picture):
                self.stats.video_frames += 1
            else:
                self.stats.video_dropped += 1

    # --- connection state ----------------------------------------------------------------

    def _connection_changed(self) -> None:
        state = self.pc.connectionState
        if state == "connected" and self.state is SourceState.RECONNECTING:
            self._notify(SourceState.STARTED, "connection restored")
        elif state == "disconnected":
            self._notify(SourceState.RECONNECTING, "the WebRTC connection was interrupted")
        elif state == "failed" and not self._closed and not self._channel.closed:
            self._fail("the WebRTC connection failed (ICE or DTLS)")

    def _notify(self, state: SourceState, detail: str = "") -> None:
        self.state = state
        change = SourceStateChange(self.stream_id, state, detail)
        for listener in list(self.listeners):
            listener(change)
