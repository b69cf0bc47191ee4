"""The live engine: sources in, active-speaker, sync and stream events out.

Per source (:class:`LiveStream`)::

    source (paced files, URLs, devices; live video dropped under load, counted)
      -> FaceStage (tracks, 112x112 grey crops)          audio -> MFCC (syncnet preset) + Silero VAD
      -> per track, every 5 frames: the streaming         per stream, every 5 frames: the audio
         visual step (shared visual batcher)               step (shared audio batcher)
      -> per track: Light-ASD speaking score, SyncNet-lite window embeddings -> sliding sync
      -> per stream: SpeakerSelector (VAD + scores, hysteresis) -> events

Every stream of one :class:`LiveEngine` shares the two batchers (:class:`LiveModels`), so the
visual steps of all tracks of all streams fill the same batches. The analysis (numpy heads, the
sync search) runs on one worker thread, never on the event loop.

Timing: a frame index is the 25 fps grid slot of the stream's video (``(pts - origin) / 40 ms``);
MFCC rows are keyed by their 10 ms step. A visual feature trails its crop by 6 frames, an audio
feature its MFCC by 6 frames plus the 5 of its step; the sync search needs 15 frames of audio
after the newest lip window. So a sync estimate describes the lips of about 0.8 s ago, and the
speaking score of about 0.3 s ago; the events carry the media time (``pts_ns``) they describe.

Latency, as the benchmark reports it: an event's wall time minus the arrival of the newest
frame it used.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from threadpoolctl import threadpool_limits

from engine.analysis.speaker import SpeakerConfig, SpeakerSelector
from engine.analysis.sync import SyncEstimate, estimate_sync, lip_match
from engine.analysis.windows import FRAME_NS
from engine.core.errors import EngineError
from engine.core.frame import Frame, FrameKind
from engine.core.stage import Pipeline
from engine.dsp.mfcc import mfcc
from engine.dsp.stage import MfccBlock, MfccStage
from engine.dsp.vad import StreamingVad, VadModel
from engine.events import make_event
from engine.identity.engine import GalleryPerson, IdentityUpdate
from engine.identity.models import PinsModels, load_config
from engine.models.live import (
    AUDIO_CONTEXT_FRAMES,
    AUDIO_STEP_FRAMES,
    DELAY_FRAMES,
    STEP_FRAMES,
    STEPS_PER_FRAME,
    LiveWeights,
    load_live_weights,
)
from engine.runtime.backends import OnnxBackend
from engine.runtime.batcher import Batcher
from engine.sources import open_source
from engine.sources.base import MediaSource, SourceState, SourceStateChange
from engine.sources.kinds import redact
from engine.sources.webrtc import WebRtcSource
from engine.vision.crops import SYNC_SMOOTH_LAG_FRAMES, CropConfig
from engine.vision.geometry import Box
from engine.vision.stage import FaceConfig, FaceCrops, FaceStage, TrackEnded, TrackStarted
from pipelines.live_identity import StreamIdentity

log = logging.getLogger(__name__)

STEP_NS = 10_000_000
GALLERY_REFRESH_S = 2.0
"""How often a running engine looks for newly enrolled people."""
LATE_VIDEO_NS = 200_000_000
"""A paced file's video frame this late (the engine lags) is dropped, as a live source's."""
Publish = Callable[[dict[str, Any]], None]
Floats = npt.NDArray[np.float32]


@dataclass(frozen=True)
class LiveConfig:
    """Settings of the live engine.

    Attributes:
        window_s: the sliding window of the sync estimate, seconds.
        min_window_s: the shortest window that gives an estimate (a new face), seconds.
        max_shift: sync shifts searched each side, frames.
        score_frames: frames the speaking score averages.
        asd_frames: frames of history the Light-ASD back-end reads per update.
        speech_min: the share of a sync window's VAD that must be speech for an estimate.
        match_window_s: the recent stretch over which each face's lips are matched to the sound
            to choose the speaker, seconds (shorter than the sync window: a quick switch).
        match_after: frames of sound past the lips the speaker match waits for.
        match_temperature: how sharply the lip match shares the speaking score out between
            faces (see ``_speaking_scores``).
        max_batch: visual steps per model call.
        max_wait_ms: how long a partial batch waits.
        stats_interval_s: how often each stream publishes a ``stats`` event.
        stall_after_s: no frame for this long marks a started stream ``stalled``.
        providers: onnxruntime providers for the models (``cpu``, ``cuda``, ``tensorrt``).
        speaker: the active-speaker thresholds.
        face: tracker and crop settings.
        loop_files: play file sources again at their end.
        identity: run the PINs identity engine (``identity`` events).
        gallery: the SQLite gallery whose names identity events carry; None for none.
    """

    window_s: float = 2.0
    min_window_s: float = 1.0
    max_shift: int = 15
    score_frames: int = 15
    asd_frames: int = 50
    speech_min: float = 0.3
    match_window_s: float = 1.0
    match_after: int = 2
    match_temperature: float = 0.02
    max_batch: int = 8
    max_wait_ms: float = 10.0
    stats_interval_s: float = 1.0
    stall_after_s: float = 2.0
    providers: str = "cpu"
    speaker: SpeakerConfig = field(default_factory=SpeakerConfig)
    face: FaceConfig = field(
        default_factory=lambda: FaceConfig(
            crops=CropConfig(smooth_lag_frames=SYNC_SMOOTH_LAG_FRAMES)
        )
    )
    loop_files: bool = False
    identity: bool = True
    gallery: Path | None = None

    @property
    def window_frames(self) -> int:
        """The sync window in frames."""
        return round(self.window_s * 25)

    @property
    def match_frames(self) -> int:
        """The speaker match's window in frames."""
        return round(self.match_window_s * 25)


class LiveModels:
    """What every stream of an engine shares: the live model's two batchers, its heads, the VAD.

    An async context manager; :attr:`visual` and :attr:`audio` are usable inside it.
    """

    def __init__(self, config: LiveConfig, weights: LiveWeights | None = None) -> None:
        """Load the models (raises :class:`~engine.core.errors.WeightsError` when missing)."""
        self.config = config
        self.weights = weights or load_live_weights()
        self.vad = VadModel()
        self.visual_backend = OnnxBackend(
            self.weights.visual_step, providers=config.providers, threads=1
        )
        self.audio_backend = OnnxBackend(
            self.weights.audio_step, providers=config.providers, threads=1
        )
        state = self.weights.state_size
        self.visual: Batcher[tuple[str, int, int]] = Batcher(
            self.visual_backend.run,
            max_batch=config.max_batch,
            max_wait_ms=config.max_wait_ms,
            max_queue=max(64, config.max_batch),
            name="live-visual",
            input_spec={
                "faces": ((STEP_FRAMES, 112, 112), np.float32),
                "state": ((state,), np.float32),
            },
        )
        self.audio: Batcher[tuple[str, int, int]] = Batcher(
            self.audio_backend.run,
            max_batch=16,
            max_wait_ms=config.max_wait_ms,
            max_queue=64,
            name="live-audio",
            input_spec={"mfcc": ((1, 13, AUDIO_STEP_FRAMES * STEPS_PER_FRAME), np.float32)},
        )
        self.analysis = concurrent.futures.ThreadPoolExecutor(1, "talkscope-analysis")
        self.pins = PinsModels(config.providers) if config.identity else None
        self.identity_config = load_config() if config.identity else None
        self.gallery: list[GalleryPerson] = []
        self._gallery_stamp: tuple[float, ...] | None = None
        if config.identity and config.gallery is not None:
            self.refresh_gallery()

    def refresh_gallery(self) -> bool:
        """Reload the gallery's people when its files changed; True when reloaded.

        In place: every stream sees them. Blocks: call it from a thread once the loop runs.
        """
        from engine.identity.gallery import Gallery
        from pipelines.identify import gallery_people

        path = self.config.gallery
        if path is None:
            return False
        stamp = tuple(
            f.stat().st_mtime if f.exists() else 0.0
            for f in (path, path.with_name(path.name + "-wal"))
        )
        if stamp == self._gallery_stamp:
            return False
        with Gallery(path, create=False) as gallery:
            self.gallery[:] = gallery_people(gallery)
        self._gallery_stamp = stamp
        return True

    async def __aenter__(self) -> LiveModels:
        """Load the DSP kernels, start the batchers."""
        await asyncio.to_thread(_warm_dsp)
        await self.visual.__aenter__()
        await self.audio.__aenter__()
        if self.pins is not None:
            await self.pins.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Stop both batchers (bounded) and the analysis thread."""
        await self.aclose()

    async def aclose(self) -> None:
        """Idempotent: close the batchers without draining, then the analysis thread."""
        for batcher in (self.visual, self.audio):
            with contextlib.suppress(Exception):
                await batcher.aclose(drain=False, timeout_s=2.0)
        if self.pins is not None:
            await self.pins.aclose()
        self.analysis.shutdown(wait=False, cancel_futures=True)


def _warm_dsp() -> None:
    """Compile (or load from Numba's cache) the MFCC kernels off the event loop.

    Otherwise the first stream's first audio does it on the loop, 0.4 s with a warm cache and
    seconds without, while every started stream's frames fall due and are dropped.
    """
    mfcc(np.zeros(3200, dtype=np.float32), 16_000, "syncnet")


class Percentiles:
    """The recent samples of one latency, in ms."""

    def __init__(self, size: int = 2048) -> None:
        """Keep the last ``size`` samples."""
        self.samples: deque[float] = deque(maxlen=size)

    def add(self, ms: float) -> None:
        """One sample."""
        self.samples.append(ms)

    def summary(self) -> dict[str, float | None]:
        """``p50``, ``p95``, ``p99`` in ms (None before any sample)."""
        if not self.samples:
            return {"p50_ms": None, "p95_ms": None, "p99_ms": None}
        values = np.percentile(np.array(self.samples), [50, 95, 99])
        return {
            "p50_ms": round(float(values[0]), 2),
            "p95_ms": round(float(values[1]), 2),
            "p99_ms": round(float(values[2]), 2),
        }


@dataclass(frozen=True)
class _Step:
    """Five consecutive crops of a track, and the track's start they belong to."""

    generation: int
    crops: list[FaceCrops]


@dataclass
class _Track:
    """One face track's live state."""

    track_id: int
    box: list[float]
    pending: list[FaceCrops] = field(default_factory=list)
    state: Floats | None = None
    fed: int = 0  # frames through the visual step since the (re)start
    generation: int = 0  # bumped when frames are missed: the track restarts
    state_generation: int = -1
    next_frame: int | None = None
    features: dict[int, Floats] = field(default_factory=dict)
    embeddings: dict[int, Floats] = field(default_factory=dict)
    scored_until: int = -1
    score: float = 0.0
    match: float | None = None  # how well the lips match the sound near offset 0, last window
    first_frame: int = 0
    boxes: dict[int, list[float]] = field(default_factory=dict)
    queue: asyncio.Queue[_Step] = field(default_factory=lambda: asyncio.Queue(4))
    task: asyncio.Task[None] | None = None


class LiveStream:
    """One source through the live engine; see the module docstring.

    Args:
        uri: path, URL or ``device:`` URI.
        stream_id: the id events carry.
        models: the engine's shared models.
        publish: where events go (called on the event loop; must not block).
        config: the engine's settings.
        source: a source opened elsewhere (a WebRTC publisher) instead of ``uri``.
    """

    def __init__(
        self,
        uri: str,
        stream_id: str,
        models: LiveModels,
        publish: Publish,
        config: LiveConfig,
        source: WebRtcSource | None = None,
    ) -> None:
        """See the class docstring."""
        self.uri = uri
        self.given_source = source
        self.source_name = redact(uri)  # what events show: credentials removed
        self.stream_id = stream_id
        self.models = models
        self.publish = publish
        self.config = config
        self.selector = SpeakerSelector(config.speaker)
        self.vad = StreamingVad(models.vad)
        self.mfcc_stage = MfccStage("syncnet")
        self.mfcc: dict[int, Floats] = {}
        self.vad_scores: dict[int, float] = {}  # 10 ms step -> speech probability
        self.audio_features: dict[int, Floats] = {}
        self.audio_embeddings: dict[int, Floats] = {}
        self.audio_until = -1  # newest frame with an audio feature
        self.next_audio_frame: int | None = None
        self.origin_ns: int | None = None
        self.first_arrival_ns: int | None = None  # monotonic ns when the first video came
        self.tracks: dict[int, _Track] = {}
        self.arrivals: dict[int, int] = {}  # frame -> monotonic ns of the newest media of it
        self.last_speaker_frame = -(10**9)
        self.latency = {
            name: Percentiles() for name in ("faces", "model", "analysis", "end_to_end")
        }
        self.counters = {"video_frames": 0, "audio_chunks": 0, "track_resets": 0, "events": 0}
        self.source: MediaSource | WebRtcSource | None = None
        self.state = "connecting"
        self._last_frame_ns = time.monotonic_ns()
        self._stalled = False
        self.identity: StreamIdentity | None = None
        if models.pins is not None and models.identity_config is not None:
            self.identity = StreamIdentity(
                stream_id, models.pins, models.identity_config, models.gallery, self._identity
            )

    def _identity(self, update: IdentityUpdate) -> None:
        self._emit(
            "identity",
            update.pts_ns,
            track_id=update.track_id,
            identity_id=update.identity_id,
            name=update.name,
            face_score=update.face_score,
            voice_match=update.voice_match,
            evidence_s=update.evidence_s,
        )

    # --- events ------------------------------------------------------------------------------

    def _emit(self, event_type: str, pts_ns: int | None, **fields: Any) -> None:
        self.counters["events"] += 1
        self.publish(make_event(event_type, self.stream_id, pts_ns, **fields))

    def _on_state(self, change: SourceStateChange) -> None:
        names = {
            SourceState.STARTED: "started",
            SourceState.RECONNECTING: "reconnecting",
            SourceState.ENDED: "ended",
            SourceState.FAILED: "error",
        }
        state = names.get(change.state)
        if state is None:
            return
        self.state = state
        self._emit(
            "stream", None, state=state, source=self.source_name, message=change.detail or None
        )

    # --- the run -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Process the source until it ends; failures become ``stream`` error events."""
        try:
            await self._run()
        except Exception as error:  # one broken stream never stops the others
            cause = _engine_error(error)
            if cause is None:
                log.exception("%s: the stream failed", self.stream_id)
            else:
                log.warning("%s: %s", self.stream_id, cause)
            if self.state != "error":
                message = str(cause) if cause is not None else f"internal error: {error!r}"
                self._emit("stream", None, state="error", source=self.source_name, message=message)

    def _open(self) -> MediaSource | WebRtcSource:
        if self.given_source is not None:
            self.given_source.listeners.append(self._on_state)
            return self.given_source
        source = open_source(
            self.uri,
            self.stream_id,
            paced=True,
            loop=self.config.loop_files,
            on_state=self._on_state,
            require_video=False,
        )
        source.late_video_ns = LATE_VIDEO_NS  # a paced file drops late video as a live one would
        return source

    async def _run(self) -> None:
        source = self.source = self._open()
        async with (
            source,
            Pipeline[Any](
                self._stamped(source),
                [FaceStage(self.config.face)],
                capacity=16,
                name=self.stream_id,
            ) as pipe,
            asyncio.TaskGroup() as group,
        ):
            helpers = [
                group.create_task(self._watch_stall(), name=f"{self.stream_id}:stall"),
                group.create_task(self._stats_loop(), name=f"{self.stream_id}:stats"),
            ]
            try:
                async for item in pipe.outputs():
                    await self._handle(item, group)
            finally:
                for task in helpers:
                    task.cancel()
                for track in list(self.tracks.values()):
                    await self._stop_track(track)
                if self.identity is not None:
                    await self.identity.aclose()

    async def _stamped(self, source: MediaSource | WebRtcSource) -> AsyncIterator[Frame]:
        async for frame in source:
            now = time.monotonic_ns()
            self._last_frame_ns = now
            if self._stalled:
                self._stalled = False
                self._emit(
                    "stream",
                    frame.pts_ns,
                    state="started",
                    source=self.source_name,
                    message="frames again",
                )
            if frame.kind is FrameKind.VIDEO:
                if self.origin_ns is None:
                    self.origin_ns, self.first_arrival_ns = frame.pts_ns, now
                self.arrivals[self._frame_of(frame.pts_ns)] = now
            elif frame.kind is FrameKind.AUDIO and self.origin_ns is not None:
                end = frame.pts_ns + frame.duration_ns
                self.arrivals.setdefault(self._frame_of(end), now)
            yield frame

    def _frame_of(self, pts_ns: int) -> int:
        origin = self.origin_ns or 0
        return round((pts_ns - origin) / FRAME_NS)

    def _pts_of(self, frame: int) -> int:
        return (self.origin_ns or 0) + frame * FRAME_NS

    async def _handle(self, item: object, group: asyncio.TaskGroup) -> None:
        if isinstance(item, Frame):
            if item.kind is FrameKind.AUDIO:
                await self._audio(item)
            elif item.kind is FrameKind.VIDEO:
                self.counters["video_frames"] += 1
        elif isinstance(item, FaceCrops):
            await self._crops(item, group)
        elif isinstance(item, TrackStarted):
            box = _rounded(item.box)
            self.tracks[item.track_id] = _Track(item.track_id, box)
            self._emit("track_start", item.pts_ns, track_id=item.track_id, box=box)
        elif isinstance(item, TrackEnded):
            track = self.tracks.pop(item.track_id, None)
            if track is not None:
                await self._stop_track(track)
            if self.identity is not None:
                self.identity.on_track_end(item.track_id)
            self._emit(
                "track_end",
                item.pts_ns,
                track_id=item.track_id,
                box=_rounded(item.box),
                frames=item.frames,
            )

    # --- audio -------------------------------------------------------------------------------

    async def _audio(self, frame: Frame) -> None:
        self.counters["audio_chunks"] += 1
        scores = self.vad.push(frame.data, frame.pts_ns)
        for score in scores:
            self.vad_scores[round(score.pts_ns / STEP_NS)] = score.probability
        if self.identity is not None:
            self.identity.on_audio(frame.pts_ns, frame.data, scores)
        for block in self.mfcc_stage.push(frame):
            self._add_mfcc(block)
        await self._audio_steps()

    def _add_mfcc(self, block: MfccBlock) -> None:
        first = round(block.pts_ns / STEP_NS)
        for i, row in enumerate(block.features.astype(np.float32)):
            self.mfcc[first + i] = row

    def _step_of(self, frame: int) -> int:
        return round(self._pts_of(frame) / STEP_NS)

    async def _audio_steps(self) -> None:
        if self.origin_ns is None or not self.mfcc:
            return
        if self.next_audio_frame is None:
            first_step = min(self.mfcc)
            self.next_audio_frame = max(0, self._frame_of(first_step * STEP_NS)) + (
                AUDIO_CONTEXT_FRAMES + 1
            )
        newest = max(self.mfcc)
        while self._step_of(self.next_audio_frame + STEP_FRAMES + AUDIO_CONTEXT_FRAMES) <= newest:
            start_frame = self.next_audio_frame - AUDIO_CONTEXT_FRAMES
            first = self._step_of(start_frame)
            steps = range(first, first + AUDIO_STEP_FRAMES * STEPS_PER_FRAME)
            if all(s in self.mfcc for s in steps):
                await self._run_audio_step(start_frame, steps)
            self.next_audio_frame += STEP_FRAMES

    async def _run_audio_step(self, start_frame: int, steps: range) -> None:
        mfcc = np.stack([self.mfcc[s] for s in steps]).T[None]  # (1, 13, 68)
        out = await self.models.audio.submit((self.stream_id, -1, start_frame), {"mfcc": mfcc})
        features = out.reshape(AUDIO_STEP_FRAMES, -1)
        first_new = start_frame + AUDIO_CONTEXT_FRAMES
        for i in range(STEP_FRAMES):
            self.audio_features[first_new + i] = features[AUDIO_CONTEXT_FRAMES + i]
        self.audio_until = first_new + STEP_FRAMES - 1
        self._trim()  # what is kept is counted back from audio_until
        await self._embed_audio()
        if not self.tracks:
            await self._speaker_update(self.audio_until)

    async def _embed_audio(self) -> None:
        head = self.models.weights.audio_head
        start = max(self.audio_embeddings, default=self.audio_until - 20) + 1
        frames = range(start, self.audio_until - 3)
        if not frames or any(
            f not in self.audio_features for f in range(start, self.audio_until + 1)
        ):
            return
        feats = np.stack([self.audio_features[f] for f in range(start, self.audio_until + 1)])
        for f, emb in zip(frames, head(feats), strict=False):
            self.audio_embeddings[f] = emb

    # --- video -------------------------------------------------------------------------------

    async def _crops(self, crops: FaceCrops, group: asyncio.TaskGroup) -> None:
        track = self.tracks.get(crops.track_id)
        if track is None:
            return
        frame = self._frame_of(crops.pts_ns)
        if self.identity is not None:
            self.identity.on_crops(crops, frame)
        arrival = self._newest_arrival(frame + self._look_ahead)
        if arrival is not None:
            self.latency["faces"].add((time.monotonic_ns() - arrival) / 1e6)
        if track.next_frame is not None and frame != track.next_frame:
            self.counters["track_resets"] += 1  # frames were dropped: start the track afresh
            track.pending.clear()
            track.generation += 1
        track.next_frame = frame + 1
        track.box = _rounded(crops.box)
        track.boxes[frame] = track.box
        track.pending.append(crops)
        if len(track.pending) == STEP_FRAMES:
            step = _Step(track.generation, track.pending)
            track.pending = []
            if track.task is None:
                track.task = group.create_task(
                    self._track_worker(track), name=f"{self.stream_id}:track{track.track_id}"
                )
            await track.queue.put(step)

    async def _stop_track(self, track: _Track) -> None:
        if track.task is not None and not track.task.done():
            track.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await track.task

    async def _track_worker(self, track: _Track) -> None:
        while True:
            step = await track.queue.get()
            first = self._frame_of(step.crops[0].pts_ns)
            if step.generation != track.state_generation:  # a new start: forget the old one
                track.state_generation = step.generation
                track.state, track.fed, track.first_frame = None, 0, first
                track.features.clear()
                track.embeddings.clear()
            await self._visual_step(track, step.crops, first)

    async def _visual_step(self, track: _Track, crops: list[FaceCrops], first: int) -> None:
        faces = np.stack([c.face112 for c in crops]).astype(np.float32) * np.float32(1 / 255)
        if track.state is None:
            track.state = np.zeros(self.models.weights.state_size, dtype=np.float32)
        newest = first + STEP_FRAMES - 1
        start_ns = time.monotonic_ns()
        out = await self.models.visual.submit(
            (self.stream_id, track.track_id, first), {"faces": faces, "state": track.state}
        )
        self.latency["model"].add((time.monotonic_ns() - start_ns) / 1e6)
        size = STEP_FRAMES * 128
        track.state = out[size:]
        features = out[:size].reshape(STEP_FRAMES, 128)
        for i in range(STEP_FRAMES):
            index = track.fed + i - DELAY_FRAMES
            if index >= 0:
                track.features[track.first_frame + index] = features[i]
        track.fed += STEP_FRAMES
        await self._analyse(track, newest)

    # --- analysis ----------------------------------------------------------------------------

    async def _analyse(self, track: _Track, newest_crop: int) -> None:
        """Score the track and update its sync; arrays are copied here, worked on a thread."""
        if not track.features or self.audio_until < 0:
            return
        start_ns = time.monotonic_ns()
        until = min(max(track.features), self.audio_until)
        frames = [
            f
            for f in range(until - self.config.asd_frames + 1, until + 1)
            if f in track.features and f in self.audio_features
        ]
        if not frames or frames[-1] != until:
            return
        visual = np.stack([track.features[f] for f in frames])
        audio = np.stack([self.audio_features[f] for f in frames])
        span = self._unembedded(track)
        feats = np.stack([track.features[f] for f in span]) if span else None
        weights = self.models.weights
        loop = asyncio.get_running_loop()
        probs, embeddings = await loop.run_in_executor(
            self.models.analysis, _score_and_embed, weights, audio, visual, feats
        )
        for f, emb in zip(span, embeddings, strict=False):
            track.embeddings[f] = emb
        track.scored_until = until
        track.score = float(probs[-self.config.score_frames :].mean())
        track.match = self._lip_match(track)
        sync = await self._sync(track, loop)
        self.latency["analysis"].add((time.monotonic_ns() - start_ns) / 1e6)
        self._latency_of(max(newest_crop + self._look_ahead, until + AUDIO_CONTEXT_FRAMES))
        if sync is not None:
            end = sync.pop("end_frame")
            box = track.boxes.get(end, track.box)
            self._emit("sync", self._pts_of(end), track_id=track.track_id, box=box, **sync)
        await self._speaker_update(until)

    @staticmethod
    def _unembedded(track: _Track) -> list[int]:
        """Frames whose features complete windows not embedded yet (from their first frame)."""
        newest = max(track.features)
        start = max(track.embeddings, default=newest - 30) + 1
        start = max(start, min(track.features))
        span = list(range(start, newest + 1))
        if len(span) < 5 or any(f not in track.features for f in span):
            return []
        return span

    def _lip_match(self, track: _Track) -> float | None:
        """How well the track's recent lips fit the sound near sync; None without enough of it.

        Over the last ``match_window_s`` of windows whose sound (``match_after`` frames past
        them) is in: the speaker choice then lags the picture by a fraction of a second, where
        the sync estimate waits for ``max_shift`` frames of future sound over a longer window.
        """
        config = self.config
        if not track.embeddings or not self.audio_embeddings:
            return None
        end = min(max(track.embeddings), max(self.audio_embeddings) - config.match_after)
        window = [f for f in range(end - config.match_frames + 1, end + 1) if f in track.embeddings]
        run = _last_run(window)
        if len(run) < config.match_frames // 2:
            return None
        pair = self._run_embeddings(track, run, config.max_shift, config.match_after)
        if pair is None:
            return None
        return lip_match(*pair, before=config.max_shift, after=config.match_after)

    def _run_embeddings(
        self, track: _Track, run: list[int], before: int, after: int
    ) -> tuple[Floats, Floats] | None:
        """The run's lip embeddings and the audio around it; None while some audio is missing.

        The audio runs from ``before`` frames ahead of the run's first frame to ``after`` frames
        past its last.
        """
        audio_frames = range(run[0] - before, run[-1] + after + 1)
        if any(f not in self.audio_embeddings for f in audio_frames):
            return None
        video = np.stack([track.embeddings[f] for f in run])
        return video, np.stack([self.audio_embeddings[f] for f in audio_frames])

    async def _sync(self, track: _Track, loop: asyncio.AbstractEventLoop) -> dict[str, Any] | None:
        config = self.config
        shift = config.max_shift
        if not track.embeddings or not self.audio_embeddings:
            return None
        end = min(max(track.embeddings), max(self.audio_embeddings) - shift)
        window = [
            f for f in range(end - config.window_frames + 1, end + 1) if f in track.embeddings
        ]
        run = _last_run(window)
        base: dict[str, Any] = {
            "window_s": config.window_s,
            "end_frame": end,
            "offset_frames": None,
            "offset_ms": None,
            "confidence": None,
            "min_dist": None,
        }
        if len(run) < round(config.min_window_s * 25):
            return base | {"state": "unknown", "frames": len(run), "reason": "warming up"}
        pair = self._run_embeddings(track, run, shift, shift)
        if pair is None:
            return base | {"state": "unknown", "frames": len(run), "reason": "no audio"}
        if self._speech(run[0], run[-1] + 5) < config.speech_min:
            return base | {"state": "unknown", "frames": len(run), "reason": "no speech"}
        estimate = await loop.run_in_executor(self.models.analysis, _estimate, *pair, shift)
        return base | {
            "state": "ok",
            "frames": len(run),
            "reason": None,
            "offset_frames": estimate.offset_frames,
            "offset_ms": estimate.offset_ms,
            "confidence": round(estimate.confidence, 4),
            "min_dist": round(estimate.min_dist, 4),
        }

    def _speech(self, first_frame: int, last_frame: int) -> float:
        """Mean VAD probability over frames ``first_frame..last_frame``."""
        lo, hi = self._step_of(first_frame), self._step_of(last_frame + 1)
        values = [p for step, p in self.vad_scores.items() if lo <= step < hi]
        return float(np.mean(values)) if values else 0.0

    async def _speaker_update(self, until: int) -> None:
        live = [t for t in self.tracks.values() if t.scored_until >= 0]
        if live:
            until = min(t.scored_until for t in live)
        if until < self.last_speaker_frame + STEP_FRAMES:
            return
        self.last_speaker_frame = until
        span = self.config.score_frames
        speech = self._speech(until - span + 1, until)
        recent = [t for t in live if t.scored_until >= until - 2 * STEP_FRAMES]
        scores = _speaking_scores(recent, self.config.match_temperature)
        decision = self.selector.update(speech, scores)
        if self.identity is not None:
            self.identity.on_speaker(self._pts_of(until), decision.track_id, decision.state)
        track = self.tracks.get(decision.track_id) if decision.track_id is not None else None
        box = track.boxes.get(until, track.box) if track is not None else None
        self._emit(
            "speaker",
            self._pts_of(until),
            track_id=decision.track_id,
            box=box,
            score=round(float(decision.score), 4),
            state=decision.state,
            since_pts_ns=None,
        )

    @property
    def _look_ahead(self) -> int:
        """Frames past a crop's own that its smoothed box read: the newest frame a crop used."""
        return self.config.face.crops.smooth_lag_frames

    def _newest_arrival(self, newest_frame: int) -> int | None:
        """Monotonic ns at which the newest media up to ``newest_frame`` arrived."""
        arrivals = [a for f, a in self.arrivals.items() if f <= newest_frame]
        return max(arrivals) if arrivals else None

    def _latency_of(self, newest_frame: int) -> None:
        arrival = self._newest_arrival(newest_frame)
        if arrival is not None:
            self.latency["end_to_end"].add((time.monotonic_ns() - arrival) / 1e6)

    def _trim(self) -> None:
        keep = self.config.window_frames + 2 * self.config.max_shift + self.config.asd_frames + 60
        newest = self.audio_until
        for table in (self.audio_features, self.audio_embeddings, self.arrivals):
            for f in [f for f in table if f < newest - keep]:
                del table[f]
        horizon = self._step_of(newest - keep)
        for steps in (self.mfcc, self.vad_scores):
            for s in [s for s in steps if s < horizon]:
                del steps[s]
        for track in self.tracks.values():
            for table in (track.features, track.embeddings, track.boxes):  # type: ignore[assignment]
                for f in [f for f in table if f < newest - keep]:
                    del table[f]

    # --- housekeeping ------------------------------------------------------------------------

    async def _watch_stall(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            idle_s = (time.monotonic_ns() - self._last_frame_ns) / 1e9
            if self.first_arrival_ns is None:
                continue  # not started yet (a WebRTC source waits for its sender reports)
            if self.state == "started" and not self._stalled and idle_s > self.config.stall_after_s:
                self._stalled = True
                self._emit(
                    "stream",
                    None,
                    state="stalled",
                    source=self.source_name,
                    message=f"no media for {idle_s:.1f} s",
                )

    async def _stats_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.stats_interval_s)
            self._emit("stats", None, **self.stats())

    def _identity_drops(self) -> dict[str, int]:
        if self.identity is None:
            return {}
        counters = self.identity.stats()
        return {k: counters.get(k, 0) for k in ("faces_skipped", "voices_skipped")}

    def stats(self) -> dict[str, Any]:
        """The ``stats`` event's fields."""
        source = self.source
        visual, audio = self.models.visual.stats, self.models.audio.stats
        return {
            "stages": {
                name: p.summary() for name, p in self.latency.items() if name != "end_to_end"
            },
            "queues": {
                "visual_batcher": visual.queue_depth,
                "audio_batcher": audio.queue_depth,
                "tracks": sum(t.queue.qsize() for t in self.tracks.values()),
            },
            "drops": {
                "video_frames": source.stats.video_dropped if source else 0,
                "track_resets": self.counters["track_resets"],
                **self._identity_drops(),
            },
            "latency_ms": {
                k.removesuffix("_ms"): v for k, v in self.latency["end_to_end"].summary().items()
            },
        }


def _engine_error(error: BaseException) -> EngineError | None:
    """The EngineError behind ``error``, also inside the exception groups of task groups."""
    if isinstance(error, EngineError):
        return error
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            found = _engine_error(inner)
            if found is not None:
                return found
    return None


def _rounded(box: Box) -> list[float]:
    """A box as the events carry it: a list, 0.1 pixel."""
    return [round(float(v), 1) for v in box]


def _score_and_embed(
    weights: LiveWeights, audio: Floats, visual: Floats, feats: Floats | None
) -> tuple[Floats, Floats]:
    """Analysis thread: P(speaking) per frame, and the window embeddings of new features."""
    probs = weights.asd(audio, visual)
    embeddings = weights.video_head(feats) if feats is not None else np.zeros((0, 256), np.float32)
    return probs, embeddings


def _speaking_scores(tracks: Sequence[_Track], temperature: float) -> dict[int, float]:
    """Each track's speaking score: Light-ASD's P(speaking), shared out by lip-sync match.

    Light-ASD says whether a face is talking while there is speech, but two talking faces over
    one voice both score near 1; the sync match says which lips fit the sound. With several
    matched tracks, each score is multiplied by ``n * softmax(match / temperature)`` (capped at
    1), so the best-matching face keeps its score and the others lose theirs.
    """
    scores = {t.track_id: t.score for t in tracks}
    matched = [t for t in tracks if t.match is not None]
    if len(matched) < 2:
        return scores
    logits = np.array([t.match for t in matched], dtype=np.float64) / temperature
    weights = np.exp(logits - logits.max())
    weights = weights / weights.sum() * len(matched)
    for t, w in zip(matched, weights, strict=True):
        scores[t.track_id] = min(1.0, t.score * float(w))
    return scores


def _estimate(video: Floats, audio: Floats, shift: int) -> SyncEstimate:
    return estimate_sync(video, audio, max_shift=shift, audio_lead=shift)


def _last_run(frames: Sequence[int]) -> list[int]:
    """The last run of consecutive frame numbers in an ascending list."""
    run: list[int] = []
    for f in frames:
        if run and f != run[-1] + 1:
            run = []
        run.append(f)
    return run


class LiveEngine:
    """Several sources, one set of shared models, one event sink.

    Args:
        sources: paths, URLs or ``device:`` URIs; stream ids are ``s0``, ``s1``, ... unless
            given as ``ID=URI``.
        publish: called on the event loop with every event.
        config: settings.

    More streams join a running engine with :meth:`add_source` (WebRTC publishers).
    """

    def __init__(
        self, sources: Sequence[str], publish: Publish, config: LiveConfig | None = None
    ) -> None:
        """See the class docstring."""
        self.config = config or LiveConfig()
        self.publish = publish
        self.sources = [split_source(text, index) for index, text in enumerate(sources)]
        self.streams: list[LiveStream] = []
        self._models: LiveModels | None = None
        self._group: asyncio.TaskGroup | None = None
        self._waiting: list[WebRtcSource] = []
        self._stream_tasks: set[asyncio.Task[None]] = set()

    async def run(self, *, keep_running: bool = False) -> None:
        """Run every stream until all have ended, or until cancelled with ``keep_running``.

        NumPy's BLAS runs single-threaded meanwhile: the engine's matrices are small and its
        parallelism is across streams and stages, where OpenBLAS's own threads only spin
        against them (three streams on two cores: 25.6 s of CPU in 14 s and 1.1 s latency with
        them, 18.3 s and 0.39 s without).
        """
        with threadpool_limits(limits=1, user_api="blas"):
            await self._run(keep_running)

    async def _run(self, keep_running: bool) -> None:
        async with LiveModels(self.config) as models, asyncio.TaskGroup() as group:
            self._models, self._group = models, group
            for stream_id, uri in self.sources:
                self._start(LiveStream(uri, stream_id, models, self.publish, self.config))
            waiting, self._waiting = self._waiting, []
            for source in waiting:
                self.add_source(source)
            refresher = None
            if self.config.identity and self.config.gallery is not None:
                refresher = group.create_task(self._refresh_gallery(models), name="gallery")
            if keep_running:
                await asyncio.Future()  # until cancelled
            if refresher is not None:
                await self._wait_streams()
                refresher.cancel()
        self._models = self._group = None

    async def _wait_streams(self) -> None:
        while any(not t.done() for t in self._stream_tasks):
            await asyncio.wait(self._stream_tasks)

    @staticmethod
    async def _refresh_gallery(models: LiveModels) -> None:
        """Pick up people enrolled while the engine runs (every few seconds)."""
        while True:
            await asyncio.sleep(GALLERY_REFRESH_S)
            try:
                if await asyncio.to_thread(models.refresh_gallery):
                    log.info("gallery reloaded: %d people", len(models.gallery))
            except EngineError as error:
                log.warning("gallery not reloaded: %s", error)

    def add_source(self, source: WebRtcSource) -> None:
        """Run one more stream, from a source opened elsewhere. Loop affinity: the engine's."""
        if self._models is None:
            self._waiting.append(source)  # the models are still loading
            return
        uri = f"webrtc:{source.stream_id}"
        self._start(
            LiveStream(uri, source.stream_id, self._models, self.publish, self.config, source)
        )

    def _start(self, stream: LiveStream) -> None:
        assert self._group is not None
        self.streams.append(stream)
        task = self._group.create_task(stream.run(), name=f"stream:{stream.stream_id}")
        self._stream_tasks.add(task)


def split_source(text: str, index: int) -> tuple[str, str]:
    """``ID=URI`` -> ``(ID, URI)``; a plain URI gets ``s<index>``."""
    head, sep, tail = text.partition("=")
    if sep and head and "/" not in head and ":" not in head and head.isidentifier():
        return head, tail
    return f"s{index}", text
