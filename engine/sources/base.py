"""The one async Source API, and the thread machinery behind every PyAV-backed source.

A source yields :class:`~engine.core.frame.Frame` s (audio at 16 kHz mono int16, video at 25 fps
RGB) with integer ``pts_ns``. Use it as an async context manager: entering opens the media and
raises a clear :class:`~engine.core.errors.EngineError` at once when it cannot be opened::

    async with open_source("clip.mp4", stream_id="cam1") as source:
        async for frame in source:
            ...

Each container is demuxed and decoded in its own thread (PyAV calls block), which hands frames
to the event loop through a bounded channel: a slow consumer holds a file back; a live source
drops its oldest video instead (counted in ``stats.video_dropped``) and never drops audio.
State changes (connecting, started, reconnecting, stalled, ended, failed) go to ``on_state``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType

from engine.core.channel import Channel, FullPolicy
from engine.core.clock import Clock, SystemClock
from engine.core.errors import ChannelClosed, EngineError, MissingStream, SourceUnavailable
from engine.core.frame import Frame, FrameKind
from engine.sources.demux import Demuxer, DemuxStats, OpenSpec
from engine.sources.normalize import AudioNormalizer, VideoGrid

log = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT_S = 5.0


class SourceState(enum.Enum):
    """Lifecycle of a source, reported through ``on_state``."""

    CONNECTING = "connecting"
    STARTED = "started"
    RECONNECTING = "reconnecting"
    ENDED = "ended"
    FAILED = "failed"


@dataclass(frozen=True)
class SourceStateChange:
    """One state transition of one source.

    Attributes:
        stream_id: the source.
        state: the new state.
        detail: a human-readable reason (the error message for FAILED and RECONNECTING).
        attempt: reconnect attempt number (0 outside reconnects).
        retry_in_s: delay before the next attempt (RECONNECTING only).
        wall_time_ns: ``time.time_ns()`` when it happened.
    """

    stream_id: str
    state: SourceState
    detail: str = ""
    attempt: int = 0
    retry_in_s: float = 0.0
    wall_time_ns: int = field(default_factory=time.time_ns)


StateCallback = Callable[[SourceStateChange], None]


@dataclass(frozen=True)
class ReconnectPolicy:
    """Exponential backoff for live network sources.

    Attributes:
        initial_s: first delay.
        max_s: ceiling of the delay.
        factor: growth per failed attempt.
        max_attempts: attempts in a row before the source fails; None retries forever.
    """

    initial_s: float = 0.5
    max_s: float = 10.0
    factor: float = 2.0
    max_attempts: int | None = None

    def delay_s(self, attempt: int) -> float:
        """Delay before attempt number ``attempt`` (1-based)."""
        return float(min(self.max_s, self.initial_s * self.factor ** max(0, attempt - 1)))


@dataclass
class SourceStats:
    """Counters of one source, readable at any time."""

    audio_frames: int = 0
    video_frames: int = 0
    video_dropped: int = 0
    reconnects: int = 0
    demux: list[DemuxStats] = field(default_factory=list)


@dataclass
class _Reached:
    """How far one decode thread's timeline got, kept even when a pass fails midway."""

    end_ns: int = 0
    wall_ns: int = 0
    """``time.monotonic_ns()`` when the last frame was delivered."""


class MediaSource:
    """A source backed by one or more PyAV containers, each demuxed in its own thread.

    Subclasses (:class:`~engine.sources.file.FileSource`, ...) only decide what to open and how
    to behave at the end of the media.

    Args:
        stream_id: stamped on every frame and state change.
        specs: the containers to open (a device source may open a camera and a microphone).
        live: drop the oldest video instead of holding the producer back when the consumer lags.
        paced: yield frames no faster than real time by their timestamps (files).
        loop: start again at the end of the media, with timestamps that keep increasing.
        reconnect: backoff for live sources; None ends the source at the end of the media.
        require_audio: fail with :class:`MissingStream` unless there is an audio stream.
        require_video: fail with :class:`MissingStream` unless there is a video stream.
        on_state: called on the event loop at every state change.
        clock: time for pacing; the system clock by default.
        capacity: frames buffered between the decode threads and the consumer.

    Attribute ``late_video_ns`` (None by default) makes a paced source behave as a live one
    under load: a video frame already later than this past its due time is dropped (counted in
    ``stats.video_dropped``) instead of being yielded late; audio is never dropped.
    """

    def __init__(
        self,
        stream_id: str,
        specs: Sequence[OpenSpec],
        *,
        live: bool,
        paced: bool = False,
        loop: bool = False,
        reconnect: ReconnectPolicy | None = None,
        require_audio: bool = False,
        require_video: bool = False,
        on_state: StateCallback | None = None,
        clock: Clock | None = None,
        capacity: int = 64,
    ) -> None:
        """See the class docstring."""
        self.stream_id = stream_id
        self.specs = list(specs)
        self.live = live
        self.paced = paced
        self.loop = loop
        self.reconnect = reconnect
        self.require_audio = require_audio
        self.require_video = require_video
        self.state = SourceState.CONNECTING
        self.stats = SourceStats()
        self._on_state = on_state
        self._clock = clock or SystemClock()
        self._channel: Channel[Frame] = Channel(
            capacity, FullPolicy.WAIT, name=f"source:{stream_id}"
        )
        self.late_video_ns: int | None = None
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._opened: list[concurrent.futures.Future[None]] = []
        self._running = 0
        self._error: EngineError | None = None
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    async def __aenter__(self) -> MediaSource:
        """Open every container; raise its error at once if one cannot be opened."""
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the decode threads and discard what is queued."""
        await self.aclose()

    async def start(self) -> None:
        """Start the decode threads and wait until each container is open (or failed).

        Raises:
            EngineError: a container could not be opened, or lacks a required stream.
        """
        if self._threads:
            return
        self._event_loop = asyncio.get_running_loop()
        self._notify(SourceState.CONNECTING)
        for index, spec in enumerate(self.specs):
            opened: concurrent.futures.Future[None] = concurrent.futures.Future()
            self._opened.append(opened)
            thread = threading.Thread(
                target=self._work,
                args=(spec, opened),
                name=f"talkscope-demux:{self.stream_id}:{index}",
                daemon=True,
            )
            self._threads.append(thread)
        self._running = len(self._threads)
        for thread in self._threads:
            thread.start()
        try:
            for opened in self._opened:
                await asyncio.wrap_future(opened)
        except EngineError:
            await self.aclose()
            raise
        self._notify(SourceState.STARTED)

    def __aiter__(self) -> AsyncIterator[Frame]:
        """Same as :meth:`frames`."""
        return self.frames()

    async def frames(self) -> AsyncIterator[Frame]:
        """Yield frames until the media ends (or the source is closed).

        Raises:
            EngineError: the source failed for good (after any reconnect attempts).
        """
        if not self._threads:
            await self.start()
        wall0: int | None = None
        pts0 = 0
        async for frame in self._channel:
            if self.paced:
                if wall0 is None:
                    wall0, pts0 = self._clock.now_ns(), frame.pts_ns
                due_ns = wall0 + frame.pts_ns - pts0
                if self._too_late(frame, due_ns):
                    continue
                await self._clock.sleep_until(due_ns)
            yield frame
        if self._error is not None:
            raise self._error

    def _too_late(self, frame: Frame, due_ns: int) -> bool:
        late = self.late_video_ns
        if late is None or frame.kind is not FrameKind.VIDEO:
            return False
        if self._clock.now_ns() - due_ns <= late:
            return False
        self.stats.video_dropped += 1
        return True

    async def aclose(self) -> None:
        """Stop the threads (bounded wait) and discard what is queued. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        self._channel.discard()
        deadline = time.monotonic() + SHUTDOWN_TIMEOUT_S
        for thread in self._threads:
            remaining = max(0.0, deadline - time.monotonic())
            await asyncio.to_thread(thread.join, remaining)
            if thread.is_alive():
                log.warning("%s: decode thread still blocked after close", self.stream_id)

    # --- the decode threads -------------------------------------------------------------

    def _work(self, spec: OpenSpec, opened: concurrent.futures.Future[None]) -> None:
        audio = AudioNormalizer(self.stream_id) if spec.want_audio else None
        video = VideoGrid(self.stream_id) if spec.want_video else None
        try:
            self._run_passes(spec, opened, audio, video)
        except ChannelClosed:
            pass
        except EngineError as error:
            if not opened.done():
                opened.set_exception(error)
            self._fail(error)
        except Exception as error:  # a bug of ours: report it, never kill the loop silently
            log.exception("%s: decode thread crashed", self.stream_id)
            wrapped = EngineError(f"{spec.label}: internal error in the decoder: {error!r}")
            if not opened.done():
                opened.set_exception(wrapped)
            self._fail(wrapped)
        finally:
            if not opened.done():
                opened.set_result(None)
            self._call_soon(self._worker_done)

    def _run_passes(
        self,
        spec: OpenSpec,
        opened: concurrent.futures.Future[None],
        audio: AudioNormalizer | None,
        video: VideoGrid | None,
    ) -> None:
        """Open, decode to the end, then loop, reconnect or stop as the source asks."""
        base_ns, attempt = 0, 0
        reached = _Reached()
        while not self._stopping.is_set():
            try:
                self._one_pass(spec, opened, audio, video, base_ns, attempt, reached)
                attempt, reason = 0, "the stream ended"
            except MissingStream:
                raise
            except EngineError as error:
                # Retry what may pass (unreachable, timed out) and any failure of a stream that
                # was already playing; fail at once on a first open that can never work (404).
                if self.reconnect is None or not (error.retryable or opened.done()):
                    raise
                reason = str(error)
            if self.loop:  # the next pass starts where this one ended, on the video grid
                base_ns = reached.end_ns
                if video is not None and video.last_slot_ns is not None:
                    base_ns = video.last_slot_ns + video.frame_ns
                continue
            if self.reconnect is None:
                return
            attempt = self._backoff(attempt, reason)

    def _one_pass(
        self,
        spec: OpenSpec,
        opened: concurrent.futures.Future[None],
        audio: AudioNormalizer | None,
        video: VideoGrid | None,
        base_ns: int,
        attempt: int,
        reached: _Reached,
    ) -> None:
        """Open the container once and deliver its frames, recording in ``reached`` how far.

        After a reconnect the new connection's clock starts afresh, so its timeline is placed
        after the last frame delivered plus the wall time the outage lasted (until it reopened).
        """
        demuxer = Demuxer(spec, self.stream_id, low_delay=self.live or self.paced)
        if attempt and reached.wall_ns:
            outage_ns = time.monotonic_ns() - reached.wall_ns
            base_ns = max(base_ns, reached.end_ns + outage_ns)
        try:
            self._check_streams(demuxer)
            self.stats.demux.append(demuxer.stats)
            if not opened.done():
                opened.set_result(None)
            elif attempt:
                self._notify(SourceState.STARTED, "reconnected", attempt)
            for frame in demuxer.frames(
                audio if demuxer.has_audio else None,
                video if demuxer.has_video else None,
                base_ns,
            ):
                self._deliver(frame)
                reached.end_ns = max(reached.end_ns, frame.end_pts_ns)
                reached.wall_ns = time.monotonic_ns()
        finally:
            demuxer.close()

    def _check_streams(self, demuxer: Demuxer) -> None:
        if len(self.specs) != 1:
            return
        label = demuxer.spec.label
        if self.require_audio and not demuxer.has_audio:
            raise MissingStream(f"{label}: the media has no audio stream")
        if self.require_video and not demuxer.has_video:
            raise MissingStream(f"{label}: the media has no video stream")

    def _backoff(self, attempt: int, reason: str) -> int:
        """Report RECONNECTING, wait (interruptibly), and return the new attempt count."""
        assert self.reconnect is not None
        attempt += 1
        limit = self.reconnect.max_attempts
        if limit is not None and attempt > limit:
            raise SourceUnavailable(f"{reason}; gave up after {limit} reconnect attempts")
        delay = self.reconnect.delay_s(attempt)
        self.stats.reconnects += 1
        self._notify(SourceState.RECONNECTING, reason, attempt, delay)
        self._stopping.wait(delay)
        return attempt

    def _deliver(self, frame: Frame) -> None:
        """Hand one frame to the loop; blocks for room unless it is live video."""
        if self._stopping.is_set():
            raise ChannelClosed("source closed")
        loop = self._event_loop
        assert loop is not None
        if self.live and frame.kind is FrameKind.VIDEO:
            accepted = asyncio.run_coroutine_threadsafe(self._offer(frame), loop).result()
            if not accepted:
                self.stats.video_dropped += 1
                return
        else:
            asyncio.run_coroutine_threadsafe(self._channel.send(frame), loop).result()
        if frame.kind is FrameKind.VIDEO:
            self.stats.video_frames += 1
        else:
            self.stats.audio_frames += 1

    async def _offer(self, frame: Frame) -> bool:
        return self._channel.send_nowait(frame)

    def _fail(self, error: EngineError) -> None:
        if self._error is None:
            self._error = error
        self._notify(SourceState.FAILED, str(error))

    def _worker_done(self) -> None:
        self._running -= 1
        if self._running == 0:
            if self._error is None and not self._closed:
                self._notify(SourceState.ENDED)
            self._channel.close()

    def _notify(
        self, state: SourceState, detail: str = "", attempt: int = 0, retry_in_s: float = 0.0
    ) -> None:
        change = SourceStateChange(self.stream_id, state, detail, attempt, retry_in_s)
        self._call_soon(self._apply_state, change)

    def _apply_state(self, change: SourceStateChange) -> None:
        self.state = change.state
        if self._on_state is not None:
            self._on_state(change)

    def _call_soon(self, callback: Callable[..., None], *args: object) -> None:
        loop = self._event_loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop closed meanwhile: nobody is listening any more
            pass
