"""Identity in the live engine: one :class:`StreamIdentity` per stream.

It takes what the stream already computes (face crops, audio, VAD scores, speaker decisions),
embeds one face in :data:`FACE_EVERY` frames per track and each speech segment through the
engine-wide :class:`~engine.identity.models.PinsModels` batchers, in background tasks so the
stream's loop never waits on them, and feeds the stream's
:class:`~engine.identity.engine.IdentityState` (the same as ``talkscope identify``'s). What it
returns is published as ``identity`` events.

Under load it skips rather than queues: a track with a face embedding still in flight skips the
next one, and at most :data:`MAX_VOICE_TASKS` segments are embedded at once (skips are counted).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np

from engine.core.errors import EngineError
from engine.dsp.vad import VadScore
from engine.identity.engine import GalleryPerson, IdentityConfig, IdentityState, IdentityUpdate
from engine.identity.models import PinsModels
from engine.identity.segments import SpeechSegment, SpeechSegmenter
from engine.vision.stage import FaceCrops

log = logging.getLogger(__name__)

FACE_EVERY = 10
"""Embed one face in this many frames of a track until it has an identity: 2.5 a second at
25 fps, so a track gets its id after 3, 1.2 s after it appears."""
FACE_EVERY_KNOWN = 50
"""Then one in this many (every 2 s), to keep its face score and evidence current. SFace costs
about 31 ms of one core a face on the 2-core machine (benchmarks/identity.py): about 80 ms a
second per new face, 15 ms a second per known one."""
MAX_VOICE_TASKS = 2
Emit = Callable[[IdentityUpdate], None]


class StreamIdentity:
    """The identity side of one live stream (see the module docstring).

    Args:
        stream_id: the stream.
        pins: the engine's shared towers.
        config: thresholds.
        gallery: the enrolled people (a list the engine refreshes in place).
        emit: called with each update, on the event loop.
    """

    def __init__(
        self,
        stream_id: str,
        pins: PinsModels,
        config: IdentityConfig,
        gallery: list[GalleryPerson],
        emit: Emit,
    ) -> None:
        """See the class docstring."""
        self.stream_id = stream_id
        self.pins = pins
        self.state = IdentityState(config, gallery)
        self.segmenter = SpeechSegmenter()
        self.emit = emit
        self.counters: Counter[str] = Counter()
        self._tasks: set[asyncio.Task[None]] = set()
        self._face_busy: set[int] = set()
        self._voice_busy = 0
        self._speaker: tuple[int, int | None, str] | None = None  # pts, track, state

    def on_audio(self, pts_ns: int, samples: np.ndarray, scores: list[VadScore]) -> None:
        """New audio and the VAD scores it completed."""
        self.segmenter.add_audio(pts_ns, samples)
        for segment in self.segmenter.add_scores(scores):
            self._voice(segment)

    def on_crops(self, crops: FaceCrops, frame: int) -> None:
        """A track's crops at stream frame ``frame``."""
        known = self.state.track_identity(crops.track_id) is not None
        if frame % (FACE_EVERY_KNOWN if known else FACE_EVERY) or not crops.observed:
            return
        if crops.track_id in self._face_busy:
            self.counters["faces_skipped"] += 1
            return
        self._face_busy.add(crops.track_id)
        self._spawn(self._face(crops), f"face{crops.track_id}")

    def on_speaker(self, pts_ns: int, track_id: int | None, state: str) -> None:
        """The active-speaker decision at ``pts_ns``."""
        self._speaker = (pts_ns, track_id, state)

    def on_track_end(self, track_id: int) -> None:
        """A track ended."""
        self.state.end_track(track_id)

    async def aclose(self) -> None:
        """Cancel what is in flight."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def stats(self) -> dict[str, int]:
        """Counters for the stream's ``stats`` event."""
        return dict(self.counters)

    # --- internals ---------------------------------------------------------------------------

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(
            work, name=f"{self.stream_id}:identity-{name}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _face(self, crops: FaceCrops) -> None:
        try:
            key = (self.stream_id, crops.track_id, crops.seq)
            pins, face = await self.pins.embed_face(key, crops.aligned)
            self.counters["faces_embedded"] += 1
            for update in self.state.add_face(crops.track_id, crops.pts_ns, pins, face):
                self.emit(update)
        except EngineError as error:
            self.counters["face_errors"] += 1
            log.warning("%s: face identity: %s", self.stream_id, error)
        finally:
            self._face_busy.discard(crops.track_id)

    def _voice(self, segment: SpeechSegment) -> None:
        if self._voice_busy >= MAX_VOICE_TASKS:
            self.counters["voices_skipped"] += 1
            return
        self._voice_busy += 1
        self._spawn(self._embed_voice(segment), "voice")

    async def _embed_voice(self, segment: SpeechSegment) -> None:
        try:
            key = (self.stream_id, -1, segment.end_ns // 1_000_000)
            pins, voice = await self.pins.embed_speech(key, segment.samples)
            self.counters["voices_embedded"] += 1
            speaker, offscreen = self._speaker_of(segment)
            for update in self.state.add_voice(
                segment.end_ns, segment.seconds, pins, voice, speaker, offscreen=offscreen
            ):
                self.emit(update)
        except EngineError as error:
            self.counters["voice_errors"] += 1
            log.warning("%s: voice identity: %s", self.stream_id, error)
        finally:
            self._voice_busy -= 1

    def _speaker_of(self, segment: SpeechSegment) -> tuple[int | None, bool]:
        """Who the speaker logic says talked at the segment's end.

        A track, off screen, or unknown when its last decision is older than the segment.
        """
        if self._speaker is None or self._speaker[0] < segment.start_ns:
            return None, False
        _, track_id, state = self._speaker
        if state == "speaking" and track_id is not None:
            return track_id, False
        return None, state == "offscreen"
