"""Speech segments for voice embeddings, cut from a stream's audio by the VAD.

Only speech goes into a segment: the chunks the VAD calls speech are joined and the pauses
dropped (resemblyzer trims silences the same way). A segment is emitted every
:attr:`SegmentConfig.hop_s` of new speech once :attr:`SegmentConfig.segment_s` of it has
gathered (the last ``segment_s`` seconds), and when a pause ends a run that had at least
``min_s`` of speech not yet emitted. Live and offline identity share it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from engine.core.frame import NS_PER_S
from engine.dsp.vad import CHUNK_NS, CHUNK_SAMPLES, SAMPLE_RATE_HZ, VadScore

Samples = npt.NDArray[np.int16]


@dataclass(frozen=True)
class SegmentConfig:
    """How speech is cut into segments.

    Attributes:
        segment_s: speech per segment, seconds (the PINs training segments are 3 s).
        hop_s: new speech between two segments of one run.
        min_s: the shortest segment, at the end of a run.
        threshold: VAD probability from which a chunk is speech.
        pause_s: silence that ends a run.
    """

    segment_s: float = 3.0
    hop_s: float = 1.5
    min_s: float = 1.0
    threshold: float = 0.5
    pause_s: float = 0.5


@dataclass(frozen=True, slots=True)
class SpeechSegment:
    """Speech samples (16 kHz int16, pauses removed) ending at ``end_ns``, stream time."""

    start_ns: int
    end_ns: int
    samples: Samples

    @property
    def seconds(self) -> float:
        """Speech in the segment."""
        return len(self.samples) / SAMPLE_RATE_HZ


class SpeechSegmenter:
    """Joins VAD-speech chunks of one stream into :class:`SpeechSegment` s.

    Feed audio with :meth:`add_audio` and the VAD's scores with :meth:`add_scores` (the scores
    refer to audio already added); both may come in any chunk sizes.
    """

    def __init__(self, config: SegmentConfig | None = None) -> None:
        """See the class docstring."""
        self.config = config or SegmentConfig()
        self._audio: deque[tuple[int, Samples]] = deque()
        self._run: list[tuple[int, Samples]] = []
        self._new = 0
        self._emitted = False
        self._silence_ns = 0

    def add_audio(self, pts_ns: int, samples: Samples) -> None:
        """Keep the raw audio until the VAD has scored it."""
        self._audio.append((pts_ns, samples))
        while len(self._audio) > 1 and self._audio[0][0] < pts_ns - 4 * NS_PER_S:
            self._audio.popleft()

    def add_scores(self, scores: list[VadScore]) -> list[SpeechSegment]:
        """Take VAD scores; returns the segments they completed."""
        out: list[SpeechSegment] = []
        for score in scores:
            if score.probability >= self.config.threshold:
                self._silence_ns = 0
                chunk = self._samples(score.pts_ns)
                if chunk is not None:
                    self._run.append((score.pts_ns, chunk))
                    self._new += len(chunk)
                    out.extend(self._full())
            else:
                self._silence_ns += CHUNK_NS
                if self._silence_ns >= self.config.pause_s * NS_PER_S:
                    out.extend(self.flush())
        return out

    def flush(self) -> list[SpeechSegment]:
        """End the current run (a pause, or the stream's end)."""
        out = []
        if self._run and self._new >= self.config.min_s * SAMPLE_RATE_HZ:
            out.append(self._segment(self.config.segment_s))
        self._run, self._new, self._emitted = [], 0, False
        return out

    def _full(self) -> list[SpeechSegment]:
        segment = int(self.config.segment_s * SAMPLE_RATE_HZ)
        have = sum(len(c) for _, c in self._run)
        if have < segment:
            return []
        if self._emitted and self._new < self.config.hop_s * SAMPLE_RATE_HZ:
            return []
        out = self._segment(self.config.segment_s)
        self._new, self._emitted = 0, True
        while sum(len(c) for _, c in self._run[1:]) >= segment:
            self._run.pop(0)
        return [out]

    def _segment(self, seconds: float) -> SpeechSegment:
        samples = np.concatenate([c for _, c in self._run])[-int(seconds * SAMPLE_RATE_HZ) :]
        start = self._run[0][0]
        end = self._run[-1][0] + CHUNK_NS
        return SpeechSegment(start, end, samples.astype(np.int16))

    def _samples(self, pts_ns: int) -> Samples | None:
        """The 512 samples the VAD chunk at ``pts_ns`` scored, from the kept audio."""
        want = round(pts_ns * SAMPLE_RATE_HZ / NS_PER_S)
        parts = []
        for start_ns, samples in self._audio:
            first = round(start_ns * SAMPLE_RATE_HZ / NS_PER_S)
            lo, hi = max(want, first), min(want + CHUNK_SAMPLES, first + len(samples))
            if lo < hi:
                parts.append(samples[lo - first : hi - first])
        if not parts:
            return None
        return np.concatenate(parts)
