"""Identity data from the shared clips: per speaking face track, face crops and 3 s voice segments.

Each clip is decoded once by the engine's own stages (:func:`pipelines.features.extract_clip`:
the tracker's ArcFace-aligned crops and the 16 kHz samples); the embedded sync model says which
tracks are talking (LSE-C confidence and a small offset), and only those give training pairs, as
the PINs recipe needs: a face and the voice heard while it speaks. Cached per clip as ``.npz``.

Per track:

- ``faces``: aligned crops ``(n, 112, 112, 3)`` every :data:`FACE_EVERY` frames;
- ``voices``: spectrogram windows ``(segments, 3, 160, 257)``: each 3 s segment (hop 1.5 s) of the
  track's audio cut into the three 1.6 s windows the voice tower embeds (shorter tracks give one
  segment, filled by repetition), scaled by level
  (:func:`engine.identity.voice.scaled_spectrogram`).
"""

from __future__ import annotations

import asyncio
import csv
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from engine.core.errors import EngineError
from engine.core.frame import NS_PER_S
from engine.identity.voice import FRAMES_PER_S, scaled_spectrogram, voice_windows
from pipelines.features import ClipFeatures, TrackFeatures, extract_clip

FACE_EVERY = 5
"""Keep one aligned crop in this many frames (5 a second at 25 fps)."""
SEGMENT_S = 3.0
SEGMENT_HOP_S = 1.5
MIN_TRACK_S = 1.0
SPEAKING_CONFIDENCE = 0.05
"""Sync confidence (LSE-C of the embedded syncnet-lite, whose scale is about 0..0.3) from
which a track counts as the one talking; with the offset bound it keeps 53 of the 60 train
tracks and drops those the model cannot lock onto."""
SPEAKING_MAX_OFFSET = 3
"""Largest sync offset, in frames, of a talking track (a real clip is near sync)."""
SAMPLE_RATE_HZ = 16_000


@dataclass
class IdentityTrack:
    """One face track of one clip, ready for the identity encoders."""

    clip: str
    identity: str
    split: str
    track_id: int
    confidence: float
    offset_frames: int
    faces: npt.NDArray[np.uint8]
    voices: npt.NDArray[np.float32]

    @property
    def speaking(self) -> bool:
        """Whether the sync model says this face is the one talking."""
        return self.confidence >= SPEAKING_CONFIDENCE and abs(self.offset_frames) <= (
            SPEAKING_MAX_OFFSET
        )


@dataclass(frozen=True)
class ClipRow:
    """One line of ``clips.csv``."""

    path: str
    identity: str
    split: str


def read_rows(data: Path, splits: set[str]) -> list[ClipRow]:
    """The rows of ``data/clips.csv`` in ``splits`` with one identity (single-face clips)."""
    with (data / "clips.csv").open(newline="") as handle:
        rows = [ClipRow(r["path"], r["identity"], r["split"]) for r in csv.DictReader(handle)]
    return [r for r in rows if r.split in splits and "+" not in r.identity]


def track_voices(features: ClipFeatures, track: TrackFeatures) -> npt.NDArray[np.float32]:
    """The voice windows ``(segments, 3, 160, 257)`` of the audio under one track."""
    start_ns = int(track.pts_ns[0]) - features.audio_start_ns
    end_ns = int(track.pts_ns[-1]) - features.audio_start_ns + NS_PER_S // 25
    first = max(0, start_ns * SAMPLE_RATE_HZ // NS_PER_S)
    last = min(len(features.audio), end_ns * SAMPLE_RATE_HZ // NS_PER_S)
    samples = features.audio[first:last]
    if len(samples) < MIN_TRACK_S * SAMPLE_RATE_HZ:
        return np.zeros((0, 3, 160, 257), dtype=np.float32)
    return segment_windows(samples)


def segment_windows(samples: npt.NDArray[np.int16]) -> npt.NDArray[np.float32]:
    """Cut 16 kHz audio into 3 s segments (hop 1.5 s), each as three voice windows."""
    magnitude = scaled_spectrogram(samples)
    seg = int(SEGMENT_S * FRAMES_PER_S)
    hop = int(SEGMENT_HOP_S * FRAMES_PER_S)
    starts = list(range(0, max(1, len(magnitude) - seg + 1), hop))
    segments = [voice_windows(magnitude[s : s + seg])[:3] for s in starts]
    return np.stack([_three(w) for w in segments]).astype(np.float32)


def _three(windows: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    while len(windows) < 3:
        windows = np.concatenate([windows, windows])
    return windows[:3]


async def prepare_clip(row: ClipRow, data: Path, runner: object) -> list[IdentityTrack]:
    """Decode one clip and cut its tracks (``runner``: an entered ``SyncRunner``)."""
    from pipelines.sync import SyncRunner

    assert isinstance(runner, SyncRunner)
    features = await extract_clip(
        str(data / row.path), want_aligned=True, want_audio=True, preset="syncnet"
    )
    report = await runner.analyse_features(features)
    by_id = {t.track_id: t for t in report.tracks}
    tracks: list[IdentityTrack] = []
    for track in features.tracks:
        sync = by_id.get(track.track_id)
        if track.aligned is None or sync is None:
            continue
        voices = track_voices(features, track)
        if len(voices) == 0:
            continue
        tracks.append(
            IdentityTrack(
                clip=row.path,
                identity=row.identity,
                split=row.split,
                track_id=track.track_id,
                confidence=float(sync.confidence or 0.0),
                offset_frames=int(sync.offset_frames or 0),
                faces=track.aligned[::FACE_EVERY].copy(),
                voices=voices,
            )
        )
    return tracks


def cache_path(cache: Path, row: ClipRow) -> Path:
    """Where one clip's tracks are cached."""
    return cache / (row.path.replace("/", "__") + ".npz")


def save_tracks(path: Path, tracks: list[IdentityTrack]) -> None:
    """Write one clip's tracks to ``path`` (``.npz``)."""
    arrays: dict[str, npt.NDArray[np.generic]] = {}
    for i, t in enumerate(tracks):
        arrays[f"t{i}_faces"] = t.faces
        arrays[f"t{i}_voices"] = t.voices.astype(np.float16)
        arrays[f"t{i}_meta"] = np.array(
            [t.clip, t.identity, t.split, t.track_id, t.confidence, t.offset_frames], dtype=object
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, n=np.array(len(tracks)), **arrays)  # type: ignore[arg-type]
    tmp.replace(path)


def load_tracks(path: Path) -> list[IdentityTrack]:
    """Read what :func:`save_tracks` wrote."""
    with np.load(path, allow_pickle=True) as z:
        out = []
        for i in range(int(z["n"])):
            clip, identity, split, track_id, confidence, offset = z[f"t{i}_meta"]
            out.append(
                IdentityTrack(
                    clip=str(clip),
                    identity=str(identity),
                    split=str(split),
                    track_id=int(track_id),
                    confidence=float(confidence),
                    offset_frames=int(offset),
                    faces=z[f"t{i}_faces"],
                    voices=z[f"t{i}_voices"].astype(np.float32),
                )
            )
    return out


async def prepare_all(data: Path, cache: Path, splits: set[str]) -> list[IdentityTrack]:
    """Every track of the clips in ``splits``, decoding only the clips not cached yet."""
    from engine.models.loading import model_spec, resolve_weights, tower_backends
    from pipelines.sync import SyncRunner

    rows = read_rows(data, splits)
    todo = [r for r in rows if not cache_path(cache, r).exists()]
    if todo:
        spec = model_spec("syncnet-lite")
        backends = await asyncio.to_thread(tower_backends, resolve_weights(spec, None))
        async with SyncRunner(spec, backends) as runner:
            for n, row in enumerate(todo, 1):
                try:
                    tracks = await prepare_clip(row, data, runner)
                except EngineError as error:
                    print(f"skip {row.path}: {error}", file=sys.stderr)
                    tracks = []
                save_tracks(cache_path(cache, row), tracks)
                print(f"[{n}/{len(todo)}] {row.path}: {len(tracks)} tracks", file=sys.stderr)
    out: list[IdentityTrack] = []
    for row in rows:
        out.extend(load_tracks(cache_path(cache, row)))
    return out
