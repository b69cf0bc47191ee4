"""Voice activity: Silero VAD (v6, the ONNX file of the ``silero-vad`` wheel) per stream.

The model takes 512 new samples at 16 kHz (32 ms) with the 64 samples before them and a
recurrent state, and gives the probability that the chunk is speech. :class:`StreamingVad`
keeps one stream's leftover samples, context and state; one ONNX session is shared by every
stream (:class:`VadModel`). A call costs about 0.1 ms on one core, so it runs inline.

The file ships in ``engine/models/weights/silero_vad`` with its MIT licence.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from engine.core.errors import WeightsError

SILERO_VAD_PATH = (
    Path(__file__).resolve().parents[1] / "models" / "weights" / "silero_vad" / ("silero_vad.onnx")
)
SAMPLE_RATE_HZ = 16_000
CHUNK_SAMPLES = 512
"""New samples per model call (32 ms)."""
CONTEXT_SAMPLES = 64
CHUNK_NS = CHUNK_SAMPLES * 1_000_000_000 // SAMPLE_RATE_HZ


@dataclass(frozen=True, slots=True)
class VadScore:
    """Speech probability of one 32 ms chunk starting at ``pts_ns``."""

    pts_ns: int
    probability: float


class VadModel:
    """The Silero VAD ONNX session (shared by all streams; onnxruntime sessions are thread-safe).

    Raises:
        WeightsError: the model file is missing or not loadable.
    """

    def __init__(self, path: Path = SILERO_VAD_PATH) -> None:
        """Load ``path`` on one CPU thread."""
        import onnxruntime as ort  # type: ignore[import-untyped]  # no py.typed, no stubs

        if not path.is_file():
            raise WeightsError(f"Silero VAD model missing: {path}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        try:
            self._session = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as error:  # onnxruntime raises its own untyped errors
            raise WeightsError(f"{path}: cannot load the VAD model ({error})") from None
        self._sr = np.array(SAMPLE_RATE_HZ, dtype=np.int64)

    def run(
        self, chunk: npt.NDArray[np.float32], state: npt.NDArray[np.float32]
    ) -> tuple[float, npt.NDArray[np.float32]]:
        """One call: ``(576,)`` samples (context + chunk) and state ``(2, 1, 128)``."""
        outputs: list[Any] = self._session.run(
            None, {"input": chunk[None, :], "state": state, "sr": self._sr}
        )
        return float(outputs[0][0, 0]), np.asarray(outputs[1], dtype=np.float32)


class StreamingVad:
    """Silero VAD over one stream's 16 kHz mono audio, pushed in chunks of any size.

    A jump in the timestamps (a gap) restarts the model state.

    Args:
        model: the shared session.
    """

    def __init__(self, model: VadModel) -> None:
        """See the class docstring."""
        self._model = model
        self._reset(0)

    def _reset(self, pts_ns: int) -> None:
        self._pending = np.zeros(0, dtype=np.float32)
        self._pending_pts_ns = pts_ns
        self._context = np.zeros(CONTEXT_SAMPLES, dtype=np.float32)
        self._state = np.zeros((2, 1, 128), dtype=np.float32)
        self._next_pts_ns: int | None = None

    def push(self, samples: npt.NDArray[Any], pts_ns: int) -> list[VadScore]:
        """Add audio (int16 or float in -1..1) starting at ``pts_ns``; the scores it completes."""
        audio = samples.astype(np.float32).reshape(-1)
        if samples.dtype == np.int16:
            audio /= 32768.0
        expected = self._next_pts_ns
        if expected is not None and abs(pts_ns - expected) > CHUNK_NS:
            self._reset(pts_ns)
        if self._pending.size == 0:
            self._pending_pts_ns = pts_ns
        self._pending = np.concatenate([self._pending, audio])
        self._next_pts_ns = pts_ns + len(audio) * 1_000_000_000 // SAMPLE_RATE_HZ
        scores = []
        while self._pending.size >= CHUNK_SAMPLES:
            chunk = self._pending[:CHUNK_SAMPLES]
            probability, self._state = self._model.run(
                np.concatenate([self._context, chunk]), self._state
            )
            scores.append(VadScore(self._pending_pts_ns, probability))
            self._context = chunk[-CONTEXT_SAMPLES:]
            self._pending = self._pending[CHUNK_SAMPLES:]
            self._pending_pts_ns += CHUNK_NS
        return scores
