"""Who is speaking now: per-track speaking scores and voice activity in, a steady decision out.

Pure and synchronous (one :class:`SpeakerSelector` per stream, fed at every update), so the live
engine and offline tools decide the same way and tests can drive it on made-up inputs.

Rules, per update:

- speech is present when the stream's voice activity (VAD probability averaged over the update's
  span) is at least ``speech_on``; it ends after ``release_updates`` updates below ``speech_off``;
- while there is speech, a track is a candidate when its speaking score (Light-ASD's probability,
  averaged over the recent frames) is at least ``score_on``;
- the current speaker keeps the floor while its score stays above ``score_off`` (hysteresis), and
  a challenger takes it only after leading by ``switch_margin`` for ``switch_updates`` updates
  in a row (no flicker between two similar faces);
- speech with no candidate for ``offscreen_updates`` updates is an off-screen voice;
- silence for ``release_updates`` updates makes nobody the speaker.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

SpeakerState = Literal["speaking", "silent", "offscreen"]


@dataclass(frozen=True)
class SpeakerConfig:
    """Thresholds and hold times of :class:`SpeakerSelector` (updates are 0.2 s apart live)."""

    speech_on: float = 0.5
    speech_off: float = 0.35
    score_on: float = 0.5
    score_off: float = 0.3
    switch_margin: float = 0.1
    switch_updates: int = 2
    offscreen_updates: int = 3
    release_updates: int = 2


@dataclass(frozen=True)
class SpeakerDecision:
    """The decision after one update.

    Attributes:
        state: ``speaking`` (``track_id`` speaks), ``silent`` or ``offscreen``.
        track_id: the speaking track; None unless ``state`` is ``speaking``.
        score: the speaker's score, or the speech probability when nobody visible speaks.
        changed: whether this update changed the state or the speaker.
    """

    state: SpeakerState
    track_id: int | None
    score: float
    changed: bool


class SpeakerSelector:
    """The active-speaker state machine of one stream (see the module docstring)."""

    def __init__(self, config: SpeakerConfig | None = None) -> None:
        """Start silent."""
        self.config = config or SpeakerConfig()
        self.state: SpeakerState = "silent"
        self.track_id: int | None = None
        self._speech = False
        self._quiet_updates = 0
        self._challenger: int | None = None
        self._challenger_updates = 0
        self._unmatched_updates = 0

    def update(self, speech: float, scores: Mapping[int, float]) -> SpeakerDecision:
        """One update: the stream's speech probability and each visible track's score."""
        before = (self.state, self.track_id)
        self._update_speech(speech)
        if not self._speech:
            self._set("silent", None)
            score = speech
        else:
            score = self._choose(scores, speech)
        return SpeakerDecision(
            self.state, self.track_id, score, (self.state, self.track_id) != before
        )

    def _update_speech(self, speech: float) -> None:
        config = self.config
        if speech >= config.speech_on:
            self._speech, self._quiet_updates = True, 0
        elif speech < config.speech_off and self._speech:
            self._quiet_updates += 1
            if self._quiet_updates >= config.release_updates:
                self._speech = False

    def _choose(self, scores: Mapping[int, float], speech: float) -> float:
        config = self.config
        current = self.track_id if self.track_id in scores else None
        best = max(scores, key=lambda t: scores[t]) if scores else None
        if current is not None and scores[current] >= config.score_off:
            self._consider_switch(current, best, scores)
            self._unmatched_updates = 0
            return scores[self.track_id] if self.track_id is not None else speech
        if best is not None and scores[best] >= config.score_on:
            self._set("speaking", best)
            self._unmatched_updates = 0
            return scores[best]
        self._unmatched_updates += 1
        if self._unmatched_updates >= config.offscreen_updates:
            self._set("offscreen", None)
        return speech

    def _consider_switch(self, current: int, best: int | None, scores: Mapping[int, float]) -> None:
        config = self.config
        if (
            best is None
            or best == current
            or scores[best] < config.score_on
            or (scores[best] - scores[current] < config.switch_margin)
        ):
            self._challenger, self._challenger_updates = None, 0
            return
        if best == self._challenger:
            self._challenger_updates += 1
        else:
            self._challenger, self._challenger_updates = best, 1
        if self._challenger_updates >= config.switch_updates:
            self._set("speaking", best)

    def _set(self, state: SpeakerState, track_id: int | None) -> None:
        if (state, track_id) != (self.state, self.track_id):
            self._challenger, self._challenger_updates = None, 0
        self.state, self.track_id = state, track_id
