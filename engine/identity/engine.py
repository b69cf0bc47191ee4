"""The identity engine of one stream: stable identity ids, voice-face match, enrolled names.

One implementation for the live engine and ``talkscope identify``: both feed it embeddings and
publish what it returns. It is synchronous, plain NumPy and belongs to one stream.

Inputs (from the PINs towers, :mod:`engine.identity.models`):

- :meth:`IdentityState.add_face`: a face track's embeddings at one frame: the PINs face
  embedding (cross-modal, 256) and the SFace embedding (face identity, 128);
- :meth:`IdentityState.add_voice`: one speech segment's PINs voice embedding and resemblyzer
  d-vector, with the track the active-speaker logic says is talking (None: nobody on screen);
- :meth:`IdentityState.end_track`: a track ended.

Identity ids are small integers, stable within the stream:

- a track gets an id once it has :attr:`IdentityConfig.min_faces` face embeddings: the id of the
  remembered identity whose face is the closest, when the SFace cosine reaches the face threshold
  (calibrated on the train split so that no two train people reach it) and no other live track
  holds it; else a new id. A face that leaves and comes back, or is cut by a scene change,
  gets its id back; a different person does not reach the threshold;
- a speech segment while a track speaks teaches that identity its voice; a segment with nobody
  speaking on screen is matched by voice (resemblyzer cosine, its own threshold) to a remembered
  voice, else becomes a voice-only identity;
- names come from the gallery: the enrolled person whose face (or, for a voice-only identity,
  voice) is the closest past the same thresholds.

``voice_match`` is the calibrated probability (Platt scaling fitted on the train split) that the
current speech belongs to a face. It flags voice-over, dubbing and a wrong face highlighted:

- when the face's identity has a voice (heard while this face was the one talking, or enrolled):
  from the resemblyzer cosine of the speech to that voice, a strong cue;
- else, from the PINs cross-modal cosine of the speech and the face: the only cue for a face
  never heard, and a weak one (``benchmarks/identity.py``: about chance on unseen people when
  each counts equally).

An identity learns its voice from the first :attr:`IdentityConfig.voice_learn_s` seconds of
speech heard while its face talks, and only segments that agree with what it has (cosine at the
voice threshold); then the voice is fixed, so a dubbed passage, or speech drifting into one a
segment at a time, does not become the voice it is checked against.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from engine.core.errors import WeightsError
from engine.core.frame import NS_PER_S

Vector = npt.NDArray[np.float32]
FACE_EVIDENCE_S = 0.2
"""Seconds of face one embedding stands for (one every 5 frames at 25 fps)."""


@dataclass(frozen=True)
class IdentityConfig:
    """Thresholds and pacing of the identity engine (defaults: ``calibration.json``).

    Attributes:
        face_threshold: SFace cosine from which two faces are one person.
        voice_threshold: resemblyzer cosine from which two voices are one person.
        match_a: Platt slope of the PINs voice-face cosine.
        match_b: Platt intercept of it.
        voice_a: Platt slope of the voice-voice (resemblyzer) cosine.
        voice_b: Platt intercept of it.
        voice_learn_s: seconds of speech an identity learns its voice from, then keeps.
        min_faces: face embeddings a track needs before it gets an id.
        voice_memory_s: how long a speech segment counts as the current speech.
        update_every_s: the least time between two events of one track that change nothing.
    """

    face_threshold: float = 0.36
    voice_threshold: float = 0.75
    match_a: float = 10.0
    match_b: float = 0.0
    voice_a: float = 10.0
    voice_b: float = -7.0
    voice_learn_s: float = 6.0
    min_faces: int = 3
    voice_memory_s: float = 3.0
    update_every_s: float = 1.0

    @classmethod
    def from_calibration(cls, path: Path, **overrides: Any) -> IdentityConfig:
        """The config of a ``calibration.json`` written by ``talkscope train pins``.

        Raises:
            WeightsError: the file is missing or not a calibration.
        """
        try:
            data = json.loads(path.read_text())
            config = cls(
                face_threshold=float(data["face_reid"]["threshold"]),
                voice_threshold=float(data["voice_reid"]["threshold"]),
                match_a=float(data["voice_match"]["a"]),
                match_b=float(data["voice_match"]["b"]),
                voice_a=float(data["voice_voice"]["a"]),
                voice_b=float(data["voice_voice"]["b"]),
            )
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise WeightsError(f"{path}: not a PINs calibration file ({error})") from error
        return replace(config, **overrides)


@dataclass(frozen=True, slots=True)
class IdentityUpdate:
    """What the engine says about one track (or an off-screen voice) at one time.

    Attributes:
        pts_ns: stream time of the evidence.
        track_id: the face track; None for a voice with nobody speaking on screen.
        identity_id: the stable id within the stream.
        name: the enrolled name, or None.
        face_score: SFace cosine of the face to the face it was recognised as (the enrolled
            person's when named, else the identity's earlier face); None for a new face or a
            voice-only identity.
        voice_match: P(the current speech is this face's voice), calibrated; None without speech
            in the last :attr:`IdentityConfig.voice_memory_s`. For an off-screen voice: the
            voice cosine to the voice it was recognised as, None when new.
        evidence_s: seconds of face and voice behind the identity.
    """

    pts_ns: int
    track_id: int | None
    identity_id: int
    name: str | None
    face_score: float | None
    voice_match: float | None
    evidence_s: float


@dataclass(frozen=True)
class GalleryPerson:
    """An enrolled person as the engine compares it: unit mean face and voice, or None."""

    name: str
    face: Vector | None
    voice: Vector | None


@dataclass
class _Identity:
    identity_id: int
    face: Vector | None = None
    face_n: int = 0
    voice: Vector | None = None
    voice_n: int = 0
    name: str | None = None
    name_score: float | None = None
    voice_s: float = 0.0

    def add_face(self, mean: Vector, count: int) -> None:
        self.face = _blend(self.face, self.face_n, mean, count)
        self.face_n += count

    def add_voice(self, vector: Vector, seconds: float) -> None:
        self.voice = _blend(self.voice, self.voice_n, vector, 1)
        self.voice_n += 1
        self.voice_s += seconds

    @property
    def evidence_s(self) -> float:
        return self.face_n * FACE_EVIDENCE_S + self.voice_s


@dataclass
class _TrackIdentity:
    track_id: int
    face_sum: Vector
    pins_sum: Vector
    count: int = 0
    identity: _Identity | None = None
    face_score: float | None = None
    last_sent_ns: int = -(10**18)
    last_sent: tuple[Any, ...] = ()

    @property
    def face(self) -> Vector:
        return unit(self.face_sum)

    @property
    def pins(self) -> Vector:
        return unit(self.pins_sum)


@dataclass
class _Speech:
    pts_ns: int
    pins: Vector
    voice: Vector
    track_id: int | None


@dataclass
class IdentityState:
    """The identities of one stream (see the module docstring).

    Args:
        config: thresholds.
        gallery: enrolled people to name identities after.
    """

    config: IdentityConfig = field(default_factory=IdentityConfig)
    gallery: list[GalleryPerson] = field(default_factory=list)
    _identities: list[_Identity] = field(default_factory=list)
    _tracks: dict[int, _TrackIdentity] = field(default_factory=dict)
    _speech: _Speech | None = None

    @property
    def identities(self) -> int:
        """Identities seen so far in the stream."""
        return len(self._identities)

    def track_identity(self, track_id: int) -> int | None:
        """The identity id of a live track, or None before it has one."""
        track = self._tracks.get(track_id)
        return track.identity.identity_id if track and track.identity else None

    def add_face(
        self, track_id: int, pts_ns: int, pins: Vector, face: Vector
    ) -> list[IdentityUpdate]:
        """One face embedding of a track; returns the updates to publish (maybe none)."""
        track = self._tracks.get(track_id)
        if track is None:
            track = self._tracks[track_id] = _TrackIdentity(
                track_id, np.zeros_like(face), np.zeros_like(pins)
            )
        track.face_sum = track.face_sum + unit(face)
        track.pins_sum = track.pins_sum + unit(pins)
        track.count += 1
        if track.identity is None and track.count >= self.config.min_faces:
            self._assign(track)
        if track.identity is None:
            return []
        return self._maybe_update(track, pts_ns)

    def end_track(self, track_id: int) -> None:
        """A track ended: its face joins its identity's memory."""
        track = self._tracks.pop(track_id, None)
        if track is None or track.identity is None:
            return
        track.identity.add_face(track.face, track.count)

    def add_voice(
        self,
        pts_ns: int,
        seconds: float,
        pins: Vector,
        voice: Vector,
        speaker: int | None,
        *,
        offscreen: bool = False,
    ) -> list[IdentityUpdate]:
        """One speech segment ending at ``pts_ns``.

        Args:
            pts_ns: the segment's end, stream time.
            seconds: speech in it.
            pins: its PINs voice embedding.
            voice: its resemblyzer embedding.
            speaker: the track talking, if one is.
            offscreen: with no ``speaker``: True when the speech is known to come from nobody
                on screen (it is identified by voice), False when who speaks is unknown (the
                segment only updates the voice-face match).
        """
        pins, voice = unit(pins), unit(voice)
        self._speech = _Speech(pts_ns, pins, voice, speaker)
        track = self._tracks.get(speaker) if speaker is not None else None
        if track is not None and track.identity is not None:
            self._learn_voice(track.identity, voice, seconds)
        elif speaker is None and offscreen:
            return [self._offscreen(pts_ns, seconds, voice)]
        out: list[IdentityUpdate] = []
        for other in self._tracks.values():
            if other.identity is not None:
                out.append(self._update(other, pts_ns))
                other.last_sent_ns = pts_ns
        return out

    def voice_match(self, track_id: int, pts_ns: int) -> float | None:
        """P(the current speech belongs to this track's face), or None without recent speech."""
        track = self._tracks.get(track_id)
        speech = self._speech
        if track is None or speech is None or track.count == 0:
            return None
        if pts_ns - speech.pts_ns > self.config.voice_memory_s * NS_PER_S:
            return None
        known = track.identity.voice if track.identity is not None else None
        if known is not None:
            cosine = float(known @ speech.voice)
            return _sigmoid(self.config.voice_a * cosine + self.config.voice_b)
        cosine = float(track.pins @ speech.pins)
        return _sigmoid(self.config.match_a * cosine + self.config.match_b)

    def _learn_voice(self, identity: _Identity, voice: Vector, seconds: float) -> None:
        """Teach an identity the voice heard while its face talks.

        Not when it disagrees with the voice the identity already has: a dub must not replace
        the voice it is checked against.
        """
        if identity.voice_s >= self.config.voice_learn_s:
            return
        if identity.voice is None or float(identity.voice @ voice) >= self.config.voice_threshold:
            identity.add_voice(voice, seconds)
            self._name(identity)

    # --- internals ---------------------------------------------------------------------------

    def _closest(
        self, vector: Vector, modality: Literal["face", "voice"]
    ) -> tuple[_Identity | None, float]:
        """The remembered identity whose face (or voice) is closest to ``vector``, and its cosine.

        Only identities no live track holds; ``(None, -1)`` when there is none.
        """
        held = {t.identity.identity_id for t in self._tracks.values() if t.identity is not None}
        best, score = None, -1.0
        for identity in self._identities:
            known = identity.face if modality == "face" else identity.voice
            if known is None or identity.identity_id in held:
                continue
            cosine = float(known @ vector)
            if cosine > score:
                best, score = identity, cosine
        return best, score

    def _assign(self, track: _TrackIdentity) -> None:
        best, score = self._closest(track.face, "face")
        if best is not None and score >= self.config.face_threshold:
            track.identity, track.face_score = best, score
        else:
            track.identity = self._new()
            track.identity.add_face(track.face, 0)
        self._name(track.identity, track.face)

    def _new(self) -> _Identity:
        identity = _Identity(len(self._identities) + 1)
        self._identities.append(identity)
        return identity

    def _name(self, identity: _Identity, face: Vector | None = None) -> None:
        face = face if face is not None else identity.face
        best, score = None, -1.0
        for person in self.gallery:
            cosine, threshold = self._person_score(person, face, identity.voice)
            if cosine is not None and cosine >= threshold and cosine > score:
                best, score = person, cosine
        if best is not None:
            identity.name, identity.name_score = best.name, score
            if identity.voice is None and best.voice is not None:
                identity.voice, identity.voice_n = best.voice, 1  # the enrolled voice

    def _person_score(
        self, person: GalleryPerson, face: Vector | None, voice: Vector | None
    ) -> tuple[float | None, float]:
        if face is not None and person.face is not None:
            return float(person.face @ face), self.config.face_threshold
        if voice is not None and person.voice is not None:
            return float(person.voice @ voice), self.config.voice_threshold
        return None, 1.0

    def _offscreen(self, pts_ns: int, seconds: float, voice: Vector) -> IdentityUpdate:
        best, score = self._closest(voice, "voice")
        if best is None or score < self.config.voice_threshold:
            best, matched = self._new(), None
        else:
            matched = round(score, 4)
        best.add_voice(voice, seconds)
        self._name(best, None)
        return IdentityUpdate(
            pts_ns=pts_ns,
            track_id=None,
            identity_id=best.identity_id,
            name=best.name,
            face_score=None,
            voice_match=matched,
            evidence_s=round(best.evidence_s, 2),
        )

    def _maybe_update(self, track: _TrackIdentity, pts_ns: int) -> list[IdentityUpdate]:
        update = self._update(track, pts_ns)
        key = (update.identity_id, update.name)
        due = pts_ns - track.last_sent_ns >= self.config.update_every_s * NS_PER_S
        if key == track.last_sent and not due:
            return []
        track.last_sent, track.last_sent_ns = key, pts_ns
        return [update]

    def _update(self, track: _TrackIdentity, pts_ns: int) -> IdentityUpdate:
        identity = track.identity
        assert identity is not None
        face_score = identity.name_score if identity.name is not None else track.face_score
        match = self.voice_match(track.track_id, pts_ns)
        return IdentityUpdate(
            pts_ns=pts_ns,
            track_id=track.track_id,
            identity_id=identity.identity_id,
            name=identity.name,
            face_score=None if face_score is None else round(face_score, 4),
            voice_match=None if match is None else round(match, 4),
            evidence_s=round(identity.evidence_s + track.count * FACE_EVIDENCE_S, 2),
        )


def unit(vectors: npt.NDArray[np.floating]) -> Vector:
    """``vectors`` scaled to length 1 along the last axis.

    One vector or rows of them; a zero vector stays zero.
    """
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    scaled: Vector = (vectors / np.maximum(norms, 1e-9)).astype(np.float32)
    return scaled


def _blend(old: Vector | None, old_n: int, new: Vector, new_n: int) -> Vector:
    if old is None or old_n == 0:
        return unit(new)
    return unit(old * old_n + new * max(1, new_n))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))
