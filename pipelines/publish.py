"""``talkscope publish SOURCE --to URL``: push any source to a WHIP endpoint over WebRTC.

The source is read by the engine's own sources (a file in real time, a URL, a ``device:``
capture), so what is published is exactly what ``talkscope serve --source`` would analyse:
16 kHz mono audio and 25 fps video. aiortc encodes them (Opus, VP8) and sends them::

    open_source --Frames--> pacing (20 ms audio pieces) --> aiortc tracks --RTP--> WHIP server

Audio goes out in 20 ms pieces, each when it is due, because aiortc's RTCP sender reports
stamp the send time of the last packet: pieces sent early would make the receiver place the
audio early, which is a lip-sync error the receiver would then measure.
The session is ended with a DELETE when the source ends or on Ctrl-C/SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import logging
import signal
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import TextIO
from urllib.parse import urljoin

import av
import numpy as np
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from engine.core.errors import EngineError, InputError, SourceUnavailable, UsageError
from engine.core.frame import Frame, FrameKind
from engine.sources import open_source
from engine.sources.base import MediaSource
from engine.sources.kinds import FileSource

log = logging.getLogger(__name__)

NS_PER_S = 1_000_000_000
AUDIO_RATE_HZ = 16000
PIECE_SAMPLES = AUDIO_RATE_HZ // 50  # 20 ms, one Opus frame
VIDEO_CLOCK_HZ = 90000
HTTP_TIMEOUT_S = 15.0
CONNECT_TIMEOUT_S = 15.0


class WhipRefused(InputError):
    """The WHIP server refused the offer (a wrong token, a bad request, no capacity)."""


@dataclass(frozen=True)
class PublishOptions:
    """What ``talkscope publish`` was asked to do."""

    source: str
    url: str
    token: str | None = None
    loop: bool = False
    seconds: float | None = None


class QueueTrack(MediaStreamTrack):
    """An aiortc track fed by the publisher's pump; ``None`` in the queue ends it."""

    def __init__(self, kind: str) -> None:
        """Make an empty track of ``kind`` ("audio" or "video")."""
        super().__init__()
        self.kind = kind
        self.queue: asyncio.Queue[av.AudioFrame | av.VideoFrame | None] = asyncio.Queue(64)

    async def recv(self) -> av.AudioFrame | av.VideoFrame:
        """The next frame, when the pump has one."""
        frame = await self.queue.get()
        if frame is None:
            self.stop()
            raise MediaStreamError
        return frame


def _audio_pieces(frame: Frame) -> list[av.AudioFrame]:
    samples = np.asarray(frame.data, dtype=np.int16).reshape(-1)
    pieces = []
    for start in range(0, samples.size, PIECE_SAMPLES):
        chunk = samples[start : start + PIECE_SAMPLES]
        piece = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        piece.sample_rate = AUDIO_RATE_HZ
        piece.time_base = fractions.Fraction(1, AUDIO_RATE_HZ)
        piece.pts = frame.pts_ns * AUDIO_RATE_HZ // NS_PER_S + start
        pieces.append(piece)
    return pieces


def _video(frame: Frame) -> av.VideoFrame:
    picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame.data), format="rgb24")
    picture.time_base = fractions.Fraction(1, VIDEO_CLOCK_HZ)
    picture.pts = frame.pts_ns * VIDEO_CLOCK_HZ // NS_PER_S
    return picture


_Timed = tuple[int, av.AudioFrame | av.VideoFrame] | None
"""A frame with its pts_ns, or None at the end."""


class _Clock:
    """Real time for a file: the first frame read is due now, the others by their pts."""

    def __init__(self, pace: bool) -> None:
        self.pace = pace
        self.wall0_s: float | None = None
        self.pts0_ns = 0

    def start(self, pts_ns: int) -> None:
        if self.wall0_s is None:
            self.wall0_s, self.pts0_ns = time.monotonic(), pts_ns

    async def wait_for(self, pts_ns: int) -> None:
        if not self.pace or self.wall0_s is None:
            return
        delay = self.wall0_s + (pts_ns - self.pts0_ns) / NS_PER_S - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


class Publisher:
    """One WHIP session: a source pumped into an aiortc peer connection.

    Args:
        options: what to publish and where.
        out: where progress lines go.
    """

    def __init__(self, options: PublishOptions, out: TextIO = sys.stderr) -> None:
        """See the class docstring."""
        self.options = options
        self.out = out
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.audio = QueueTrack("audio")
        self.video = QueueTrack("video")
        self.resource: str | None = None
        self.stream_id: str | None = None
        self.sent = {"audio": 0, "video": 0}
        self._connected = asyncio.Event()
        self._failed = asyncio.Event()
        self.pc.on("connectionstatechange", self._state_changed)

    def _state_changed(self) -> None:
        state = self.pc.connectionState
        if state == "connected":
            self._connected.set()
        elif state == "failed":
            self._failed.set()

    async def run(self) -> None:
        """Open the source, publish it until it ends, then end the session.

        Raises:
            EngineError: the source cannot be read, the server refused, or ICE failed.
        """
        source = open_source(
            self.options.source, "publish", loop=self.options.loop, require_video=False
        )
        async with source:
            try:
                await self._offer()
                await self._wait_connected()
                await self._pump(source, pace=isinstance(source, FileSource))
            finally:
                await self._close()

    async def _offer(self) -> None:
        self.pc.addTransceiver(self.audio, direction="sendonly")
        self.pc.addTransceiver(self.video, direction="sendonly")
        await self.pc.setLocalDescription(await self.pc.createOffer())
        sdp = self.pc.localDescription.sdp
        status, headers, body = await asyncio.to_thread(
            self._http, "POST", self.options.url, sdp.encode("utf-8")
        )
        if status != 201:
            text = body.decode("utf-8", "replace").strip()
            raise WhipRefused(f"{self.options.url}: the server answered {status}: {text}")
        self.resource = urljoin(self.options.url, headers.get("location", ""))
        self.stream_id = headers.get("x-talkscope-stream-id")
        answer = RTCSessionDescription(body.decode("utf-8"), "answer")
        await self.pc.setRemoteDescription(answer)
        print(f"talkscope: publishing as stream {self.stream_id}", file=self.out, flush=True)

    async def _wait_connected(self) -> None:
        connected = asyncio.create_task(self._connected.wait())
        failed = asyncio.create_task(self._failed.wait())
        done, pending = await asyncio.wait(
            {connected, failed}, timeout=CONNECT_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
        )
        for task in pending:
            task.cancel()
        if connected not in done:
            raise SourceUnavailable(f"{self.options.url}: the WebRTC connection did not open")

    async def _pump(self, source: MediaSource, *, pace: bool) -> None:
        """Read the source and hand its frames to two pacers, one per kind.

        A container interleaves audio and video in chunks (often half a second apart); pacing
        them in one sequence would send the later kind late, and its sender reports with it.
        """
        audio: asyncio.Queue[_Timed] = asyncio.Queue(256)  # 5 s of 20 ms pieces
        video: asyncio.Queue[_Timed] = asyncio.Queue(128)  # 5 s at 25 fps
        clock = _Clock(pace)
        async with asyncio.TaskGroup() as group:
            group.create_task(self._pace(audio, self.audio, clock, "audio"))
            group.create_task(self._pace(video, self.video, clock, "video"))
            try:
                await self._read(source, clock, audio, video)
            finally:
                for queue in (audio, video):
                    await queue.put(None)

    async def _read(
        self,
        source: MediaSource,
        clock: _Clock,
        audio: asyncio.Queue[_Timed],
        video: asyncio.Queue[_Timed],
    ) -> None:
        limit_ns = None if self.options.seconds is None else int(self.options.seconds * NS_PER_S)
        async for frame in source:
            if self._failed.is_set():
                raise SourceUnavailable(f"{self.options.url}: the WebRTC connection failed")
            clock.start(frame.pts_ns)
            if limit_ns is not None and frame.pts_ns - clock.pts0_ns > limit_ns:
                break
            if frame.kind is FrameKind.AUDIO:
                for piece in _audio_pieces(frame):
                    await audio.put((int(piece.pts or 0) * NS_PER_S // AUDIO_RATE_HZ, piece))
            elif frame.kind is FrameKind.VIDEO:
                await video.put((frame.pts_ns, _video(frame)))

    async def _pace(
        self, queue: asyncio.Queue[_Timed], track: QueueTrack, clock: _Clock, kind: str
    ) -> None:
        while (item := await queue.get()) is not None:
            pts_ns, frame = item
            await clock.wait_for(pts_ns)
            await track.queue.put(frame)
            self.sent[kind] += frame.samples if isinstance(frame, av.AudioFrame) else 1

    async def _close(self) -> None:
        for track in (self.audio, self.video):
            with contextlib.suppress(asyncio.QueueFull):
                track.queue.put_nowait(None)
        if self.resource is not None:
            with contextlib.suppress(OSError, EngineError):
                await asyncio.to_thread(self._http, "DELETE", self.resource, b"")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.pc.close(), 5.0)

    def _http(self, method: str, url: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        request = urllib.request.Request(url, data=body or None, method=method)
        if body:
            request.add_header("Content-Type", "application/sdp")
        if self.options.token:
            request.add_header("Authorization", f"Bearer {self.options.token}")
        try:
            with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
                headers = {k.lower(): v for k, v in response.headers.items()}
                return response.status, headers, response.read()
        except urllib.error.HTTPError as error:
            return error.code, {}, error.read()
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise SourceUnavailable(f"{url}: cannot reach the server: {reason}") from error


async def publish(options: PublishOptions, out: TextIO = sys.stderr) -> int:
    """Publish until the source ends or a signal arrives; the exit code.

    Raises:
        EngineError: see :meth:`Publisher.run`.
    """
    if not options.url.startswith(("http://", "https://")):
        raise UsageError(f"--to must be an http(s) WHIP URL, got {options.url!r}")
    publisher = Publisher(options, out)
    task = asyncio.create_task(publisher.run(), name="publish")
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        print("talkscope: publishing stopped", file=out, flush=True)
        return 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
    sent = publisher.sent
    print(
        f"talkscope: published {sent['video']} video frames, "
        f"{sent['audio'] / AUDIO_RATE_HZ:.1f} s of audio",
        file=out,
        flush=True,
    )
    return 0
