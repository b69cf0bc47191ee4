"""The shipped PINs towers behind the shared cross-stream batchers, and their calibration.

:class:`PinsModels` holds one onnxruntime session and one :class:`~engine.runtime.batcher.Batcher`
per tower, shared by every stream and track of an engine (live) or every file of a run
(``talkscope identify``). :meth:`PinsModels.embed_face` takes one aligned crop,
:meth:`PinsModels.embed_voice` one segment's magnitude spectrogram (its windows are batched
with everybody else's); both return the PINs embedding and the unimodal one.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from engine.core.errors import WeightsError
from engine.identity.engine import IdentityConfig, unit
from engine.identity.voice import scaled_spectrogram, voice_windows
from engine.models.pins import EMBEDDING_SIZE, FACE_TOWER, VOICE_TOWER, PinsTowerSpec
from engine.models.spec import sha256_file
from engine.runtime.backends import OnnxBackend
from engine.runtime.batcher import Batcher

PINS_WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "models" / "weights" / "pins"
MODEL_NAME = "pins-sface-resemblyzer-v1"
"""What gallery vectors are tagged with: vectors of another model are never compared."""

Floats = npt.NDArray[np.float32]
Key = tuple[str, int, int]


def tower_path(tower: PinsTowerSpec, directory: Path = PINS_WEIGHTS_DIR) -> Path:
    """The shipped ONNX file of a tower.

    Raises:
        WeightsError: the file is missing (a broken install).
    """
    path = directory / tower.file_name
    if not path.is_file():
        raise WeightsError(
            f"PINs {tower.modality} tower missing: {path}; reinstall talkscope, or run "
            "`talkscope train pins` to build it"
        )
    return path


def load_config(directory: Path = PINS_WEIGHTS_DIR, **overrides: Any) -> IdentityConfig:
    """The identity thresholds calibrated with the shipped towers."""
    return IdentityConfig.from_calibration(directory / "calibration.json", **overrides)


def weights_digest(directory: Path = PINS_WEIGHTS_DIR) -> str:
    """Short SHA-256 of both towers, for reports."""
    return "+".join(sha256_file(tower_path(t, directory))[:12] for t in (FACE_TOWER, VOICE_TOWER))


class PinsModels:
    """Both PINs towers, each behind one batcher; an async context manager.

    Args:
        providers: onnxruntime providers (``cpu``, ``cuda``, ``tensorrt``).
        max_batch: items per model call.
        max_wait_ms: how long a partial batch waits.
        directory: where the towers are.
        threads: onnxruntime threads per session.
    """

    def __init__(
        self,
        providers: str = "cpu",
        *,
        max_batch: int = 16,
        max_wait_ms: float = 10.0,
        directory: Path = PINS_WEIGHTS_DIR,
        threads: int | None = 1,
    ) -> None:
        """Load both towers (raises :class:`WeightsError` when missing)."""
        self.face_backend = OnnxBackend(
            tower_path(FACE_TOWER, directory), providers=providers, threads=threads
        )
        self.voice_backend = OnnxBackend(
            tower_path(VOICE_TOWER, directory), providers=providers, threads=threads
        )
        self.face: Batcher[Key] = self._batcher(
            self.face_backend, FACE_TOWER, max_batch, max_wait_ms
        )
        self.voice: Batcher[Key] = self._batcher(
            self.voice_backend, VOICE_TOWER, max_batch, max_wait_ms
        )

    @staticmethod
    def _batcher(
        backend: OnnxBackend, tower: PinsTowerSpec, max_batch: int, max_wait_ms: float
    ) -> Batcher[Key]:
        return Batcher(
            backend.run,
            max_batch=max_batch,
            max_wait_ms=max_wait_ms,
            max_queue=max(64, 4 * max_batch),
            name=f"pins-{tower.modality}",
            input_spec={tower.input.name: (tower.input.shape, np.float32)},
        )

    @property
    def providers(self) -> tuple[str, ...]:
        """Where the face tower really runs."""
        return self.face_backend.providers

    async def __aenter__(self) -> PinsModels:
        """Start both batchers."""
        await self.face.__aenter__()
        await self.voice.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Stop both batchers."""
        await self.aclose()

    async def aclose(self) -> None:
        """Idempotent: close both batchers without draining."""
        for batcher in (self.face, self.voice):
            with contextlib.suppress(Exception):
                await batcher.aclose(drain=False, timeout_s=2.0)

    async def embed_face(self, key: Key, aligned: npt.NDArray[np.uint8]) -> tuple[Floats, Floats]:
        """PINs and SFace embeddings of one aligned crop ``(112, 112, 3)`` RGB."""
        face = np.ascontiguousarray(aligned.transpose(2, 0, 1), dtype=np.float32)
        out = await self.face.submit(key, {FACE_TOWER.input.name: face})
        return split(out)

    async def embed_speech(self, key: Key, samples: npt.NDArray[np.int16]) -> tuple[Floats, Floats]:
        """PINs and resemblyzer embeddings of 16 kHz speech samples.

        The scaled spectrogram is computed in a worker thread, then :meth:`embed_voice`.
        """
        magnitude = await asyncio.to_thread(scaled_spectrogram, samples)
        return await self.embed_voice(key, magnitude)

    async def embed_voice(self, key: Key, magnitude: Floats) -> tuple[Floats, Floats]:
        """PINs and resemblyzer embeddings of one speech segment.

        ``magnitude`` is its scaled magnitude spectrogram ``(frames, 257)``; its 1.6 s windows
        are embedded and averaged (any length).
        """
        windows = voice_windows(magnitude)
        rows = await self.voice.submit_many(
            ((key[0], key[1], key[2] + i), {VOICE_TOWER.input.name: w})
            for i, w in enumerate(windows)
        )
        pins, voice = zip(*(split(r) for r in rows), strict=True)
        return unit(np.mean(pins, axis=0)), unit(np.mean(voice, axis=0))


def split(row: npt.NDArray[Any]) -> tuple[Floats, Floats]:
    """A tower's output row: the PINs embedding, then the unimodal one."""
    row = np.asarray(row, dtype=np.float32)
    return row[:EMBEDDING_SIZE], row[EMBEDDING_SIZE:]
