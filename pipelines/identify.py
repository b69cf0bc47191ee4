"""Offline identity: ``talkscope identify`` and ``talkscope enroll``.

A file is decoded once (:func:`pipelines.features.extract_clip`: tracks, aligned crops, audio),
its tracks' sync is estimated by the embedded sync model (who is talking), the VAD cuts its
speech into segments (:class:`~engine.identity.segments.SpeechSegmenter`), both PINs towers embed
faces and voices through the shared batchers (:class:`~engine.identity.models.PinsModels`), and
the stream's :class:`~engine.identity.engine.IdentityState` (the live engine's, unchanged) turns
them into identities, fed in time order.

Who speaks during a segment, offline: among the tracks on screen then, the one whose lips the
sync model matches to that stretch of sound (sync over the segment's windows:
:data:`pipelines.pins_data.SPEAKING_CONFIDENCE` or more, offset within 3 frames), the most
confident if several; nobody (an off-screen voice) when none does.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from engine.core.errors import InputError
from engine.core.frame import NS_PER_S, FrameKind
from engine.dsp.vad import StreamingVad, VadModel
from engine.identity.engine import (
    GalleryPerson,
    IdentityConfig,
    IdentityState,
    IdentityUpdate,
    unit,
)
from engine.identity.gallery import Gallery
from engine.identity.models import MODEL_NAME, PinsModels
from engine.identity.segments import SpeechSegment, SpeechSegmenter
from pipelines.features import ClipFeatures, extract_clip
from pipelines.pins_data import FACE_EVERY, SPEAKING_CONFIDENCE, SPEAKING_MAX_OFFSET
from pipelines.sync import TrackSync

MAX_SHIFT = 15
"""Shifts searched each side when matching lips to a speech segment, frames."""
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})

Floats = npt.NDArray[np.float32]


@dataclass
class TrackIdentity:
    """One track's identity in a file's report."""

    track_id: int
    identity_id: int | None
    name: str | None
    box: list[float]
    face_score: float | None
    voice_match: float | None
    speaking: bool
    start_s: float
    end_s: float
    voice_checks: list[list[float]] = field(default_factory=list)


@dataclass
class FileIdentityReport:
    """What ``talkscope identify`` prints for one file."""

    file: str
    tracks: list[TrackIdentity]
    voices: list[dict[str, Any]]
    identities: int
    seconds: float
    updates: list[IdentityUpdate] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """One JSON object per file (``--json``)."""
        return {
            "file": self.file,
            "identities": self.identities,
            "tracks": [t.__dict__ for t in self.tracks],
            "offscreen_voices": self.voices,
            "seconds": round(self.seconds, 2),
        }


def gallery_people(gallery: Gallery | None) -> list[GalleryPerson]:
    """The enrolled people as the identity engine compares them (unit means per modality)."""
    if gallery is None:
        return []
    people = []
    for person in gallery.people(MODEL_NAME):
        face = unit(person.faces.mean(axis=0)) if len(person.faces) else None
        voice = unit(person.voices.mean(axis=0)) if len(person.voices) else None
        people.append(GalleryPerson(person.name, face, voice))
    return people


def speech_segments(
    audio: npt.NDArray[np.int16], start_ns: int, vad: VadModel
) -> list[SpeechSegment]:
    """The speech segments of a whole recording (VAD, then the segmenter)."""
    stream = StreamingVad(vad)
    segmenter = SpeechSegmenter()
    out: list[SpeechSegment] = []
    piece = 16_000 // 5
    for first in range(0, len(audio), piece):
        samples = audio[first : first + piece]
        pts = start_ns + first * NS_PER_S // 16_000
        segmenter.add_audio(pts, samples)
        out.extend(segmenter.add_scores(stream.push(samples, pts)))
    out.extend(segmenter.flush())
    return out


class IdentifyRunner:
    """Identifies the people of files; an async context manager owning the models.

    Args:
        config: identity thresholds (default: the shipped calibration).
        gallery: enrolled people to name.
    """

    def __init__(self, config: IdentityConfig, gallery: list[GalleryPerson]) -> None:
        """Load the towers and the VAD."""
        self.config = config
        self.gallery = gallery
        self.pins = PinsModels()
        self.vad = VadModel()
        self._sync: Any = None
        self._stack: Any = None

    async def __aenter__(self) -> IdentifyRunner:
        """Start the batchers (PINs and the sync model's)."""
        from contextlib import AsyncExitStack

        from engine.models.loading import model_spec, resolve_weights, tower_backends
        from pipelines.sync import SyncRunner

        spec = model_spec("syncnet-lite")
        backends = await asyncio.to_thread(tower_backends, resolve_weights(spec, None))
        self._stack = AsyncExitStack()
        await self._stack.enter_async_context(self.pins)
        self._sync = await self._stack.enter_async_context(
            SyncRunner(spec, backends, keep_embeddings=True)
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Stop the batchers."""
        if self._stack is not None:
            await self._stack.aclose()

    async def identify_file(self, uri: str) -> FileIdentityReport:
        """The identities of one file.

        Raises:
            EngineError: the file cannot be decoded, or a model call failed.
        """
        start = time.perf_counter()
        features = await extract_clip(
            uri, want_aligned=True, want_audio=True, preset="syncnet", require_audio=False
        )
        report = await self._sync.analyse_features(features)
        syncs = {t.track_id: t for t in report.tracks}
        speaking = {
            t.track_id: float(t.confidence or 0.0)
            for t in report.tracks
            if (t.confidence or 0.0) >= SPEAKING_CONFIDENCE
            and abs(t.offset_frames or 0) <= SPEAKING_MAX_OFFSET
        }
        faces = await self._faces(uri, features)
        segments = speech_segments(features.audio, features.audio_start_ns, self.vad)
        voices = await asyncio.gather(*(self._voice(uri, i, seg) for i, seg in enumerate(segments)))
        state = IdentityState(self.config, self.gallery)
        updates = _replay(state, features, faces, segments, voices, syncs)
        return _report(uri, features, state, updates, speaking, time.perf_counter() - start)

    async def _faces(
        self, uri: str, features: ClipFeatures
    ) -> list[tuple[int, int, Floats, Floats]]:
        jobs = []
        for track in features.tracks:
            assert track.aligned is not None
            for i in range(0, len(track.pts_ns), FACE_EVERY):
                if track.observed[i]:
                    key = (uri, track.track_id, i)
                    jobs.append((track.track_id, int(track.pts_ns[i]), key, track.aligned[i]))
        rows = await asyncio.gather(*(self.pins.embed_face(key, crop) for _, _, key, crop in jobs))
        return [(tid, pts, p, f) for (tid, pts, _, _), (p, f) in zip(jobs, rows, strict=True)]

    async def _voice(self, uri: str, index: int, segment: SpeechSegment) -> tuple[Floats, Floats]:
        return await self.pins.embed_speech((uri, -1, index * 100), segment.samples)


def _replay(
    state: IdentityState,
    features: ClipFeatures,
    faces: list[tuple[int, int, Floats, Floats]],
    segments: list[SpeechSegment],
    voices: list[tuple[Floats, Floats]],
    syncs: dict[int, TrackSync],
) -> list[IdentityUpdate]:
    """Feed the identity state in time order: faces, track ends and speech segments."""
    events: list[tuple[int, int, Any]] = []
    for tid, pts, pins, face in faces:
        events.append((pts, 0, ("face", tid, pins, face)))
    for track in features.tracks:
        events.append((int(track.pts_ns[-1]) + 1, 2, ("end", track.track_id)))
    for segment, (pins, voice) in zip(segments, voices, strict=True):
        speaker = _speaker_of(segment, syncs)
        events.append((segment.end_ns, 1, ("voice", segment, pins, voice, speaker)))
    updates: list[IdentityUpdate] = []
    for pts, _, item in sorted(events, key=lambda e: (e[0], e[1])):
        if item[0] == "face":
            updates.extend(state.add_face(item[1], pts, item[2], item[3]))
        elif item[0] == "voice":
            segment = item[1]
            speaker = item[4]
            updates.extend(
                state.add_voice(
                    pts, segment.seconds, item[2], item[3], speaker, offscreen=speaker is None
                )
            )
        else:
            state.end_track(item[1])
    return updates


def _speaker_of(segment: SpeechSegment, syncs: dict[int, TrackSync]) -> int | None:
    """The track whose lips match the segment's sound best, if any does."""
    best, score = None, -1.0
    for track_id, sync in syncs.items():
        if sync.embeddings is None:
            continue
        estimate = sync.embeddings.estimate(segment.start_ns, segment.end_ns, MAX_SHIFT)
        if estimate is None or abs(estimate.offset_frames) > SPEAKING_MAX_OFFSET:
            continue
        if estimate.confidence >= SPEAKING_CONFIDENCE and estimate.confidence > score:
            best, score = track_id, estimate.confidence
    return best


def _report(
    uri: str,
    features: ClipFeatures,
    state: IdentityState,
    updates: list[IdentityUpdate],
    speaking: dict[int, float],
    seconds: float,
) -> FileIdentityReport:
    last: dict[int, IdentityUpdate] = {}
    matches: dict[int, dict[int, float]] = {}
    voices: dict[int, IdentityUpdate] = {}
    for update in updates:
        if update.track_id is None:
            voices[update.identity_id] = update
            continue
        last[update.track_id] = update
        if update.voice_match is not None:
            matches.setdefault(update.track_id, {})[update.pts_ns] = update.voice_match
    tracks = []
    for track in features.tracks:
        final = last.get(track.track_id)
        checks = matches.get(track.track_id, {})
        values = list(checks.values())
        tracks.append(
            TrackIdentity(
                track_id=track.track_id,
                identity_id=final.identity_id if final else None,
                name=final.name if final else None,
                box=track.box,
                face_score=final.face_score if final else None,
                voice_match=round(float(np.mean(values)), 4) if values else None,
                speaking=track.track_id in speaking,
                start_s=round(int(track.pts_ns[0]) / NS_PER_S, 2),
                end_s=round(int(track.pts_ns[-1]) / NS_PER_S, 2),
                voice_checks=[[round(t / NS_PER_S, 2), m] for t, m in sorted(checks.items())],
            )
        )
    offscreen = [
        {"identity_id": u.identity_id, "name": u.name, "evidence_s": u.evidence_s}
        for u in voices.values()
    ]
    return FileIdentityReport(uri, tracks, offscreen, state.identities, seconds, updates)


# --- enrolment --------------------------------------------------------------------------------


async def face_vectors(path: str, pins: PinsModels) -> Floats:
    """SFace embeddings of the enrolment face.

    The one face of an image, or every fifth frame of the longest track of a clip.

    Raises:
        InputError: no face found, or the file cannot be read.
    """
    if Path(path).suffix.lower() in IMAGE_SUFFIXES:
        crops = [await asyncio.to_thread(_image_crop, path)]
    else:
        features = await extract_clip(path, want_aligned=True, require_audio=False)
        if not features.tracks:
            raise InputError(f"{path}: no face found to enroll")
        track = max(features.tracks, key=lambda t: len(t.pts_ns))
        assert track.aligned is not None
        crops = [track.aligned[i] for i in range(0, len(track.pts_ns), FACE_EVERY)]
    rows = await asyncio.gather(
        *(pins.embed_face(("enroll", 0, i), crop) for i, crop in enumerate(crops))
    )
    return np.stack([face for _, face in rows])


def _image_crop(path: str) -> npt.NDArray[np.uint8]:
    import cv2

    from engine.vision.crops import align_points_of, aligned_face
    from engine.vision.stage import default_backend

    bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    if bgr is None:
        raise InputError(f"{path}: not an image OpenCV can read")
    rgb = np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), dtype=np.uint8)
    backend = default_backend()
    detections = backend.detect(rgb)
    if not detections:
        raise InputError(f"{path}: no face found to enroll")
    best = max(detections, key=lambda d: (d.box[2] - d.box[0]) * (d.box[3] - d.box[1]))
    mesh = backend.mesh(rgb, backend.roi_from_detection(best))
    return aligned_face(rgb, align_points_of(mesh.points))


async def voice_vectors(path: str, pins: PinsModels, vad: VadModel) -> Floats:
    """Resemblyzer embeddings of the enrolment voice: each speech segment of the clip.

    Raises:
        InputError: no speech found, or the file cannot be read.
    """
    audio, start_ns = await read_audio(path)
    segments = speech_segments(audio, start_ns, vad)
    if not segments:
        raise InputError(f"{path}: no speech found to enroll (need at least 1 s)")
    rows = []
    for i, segment in enumerate(segments):
        rows.append(await pins.embed_speech(("enroll", -1, i * 100), segment.samples))
    return np.stack([voice for _, voice in rows])


async def read_audio(path: str) -> tuple[npt.NDArray[np.int16], int]:
    """The 16 kHz mono samples of a file's audio (video ignored), and the first one's time."""
    from engine.sources import open_source

    parts: list[npt.NDArray[np.int16]] = []
    start_ns: int | None = None
    source = open_source(path, require_audio=True, require_video=False)
    async with source:
        async for frame in source:
            if frame.kind is FrameKind.AUDIO:
                if start_ns is None:
                    start_ns = frame.pts_ns
                parts.append(frame.data)
    if not parts or start_ns is None:
        raise InputError(f"{path}: no audio decoded")
    return np.concatenate(parts).astype(np.int16), start_ns


async def enroll(
    name: str, gallery: Gallery, *, face: str | None, voice: str | None
) -> dict[str, Any]:
    """Add ``name`` to ``gallery`` from a face image or clip and a voice clip.

    Raises:
        UsageError: neither a face nor a voice given, or a bad name.
        InputError: no face / no speech found, or a file cannot be read.
    """
    from engine.core.errors import UsageError

    if face is None and voice is None:
        raise UsageError("enroll needs --face IMAGE_OR_CLIP and/or --voice CLIP")
    async with PinsModels() as pins:
        faces = await face_vectors(face, pins) if face else np.zeros((0, 0), np.float32)
        voices = (
            await voice_vectors(voice, pins, VadModel()) if voice else np.zeros((0, 0), np.float32)
        )
    source = "; ".join(f"{k}={v}" for k, v in (("face", face), ("voice", voice)) if v)
    await asyncio.to_thread(
        gallery.enroll,
        name,
        model=MODEL_NAME,
        faces=faces if len(faces) else (),
        voices=voices if len(voices) else (),
        source=source,
    )
    return {"name": name, "faces": len(faces), "voices": len(voices), "gallery": str(gallery.path)}
