"""The live model: Light-ASD and SyncNet-lite split so that a stream is encoded once, step by step.

Offline, SyncNet-lite's towers take 64-frame chunks (:mod:`engine.models.syncnet_lite`). Live, a
track grows by :data:`STEP_FRAMES` frames at a time and every step needs fresh answers, so the
same weights run as four pieces:

- ``visual_step.onnx``: Light-ASD's visual encoder as a streaming step
  (:class:`~engine.models.light_asd.StreamingVisualEncoder`): 5 new face crops and the track's
  state in, the features of 5 frames (6 frames older) and the new state out. Each frame is
  encoded once; this is the costly part, batched across every stream and track.
- ``audio_step.onnx``: Light-ASD's audio encoder on the MFCC of 17 frames (the 5 new ones and 6 of
  context a side), per stream, of which the middle 5 features are kept. Cheap, so it is simply
  re-run with its context.
- ``heads.npz``, run in numpy per track: SyncNet-lite's two window heads (5 features -> one
  256-d window embedding; BatchNorm folded in) and Light-ASD's back-end (two GRUs and the
  audio-visual classifier -> a speaking probability per frame).

The encoders and the back-end are Light-ASD's (MIT, ``LICENSE.light-asd``), the heads ours
(trained by :mod:`pipelines.train_sync`). ``python -m pipelines.export_live`` rebuilds the folder
from the two checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from engine.core.errors import WeightsError

LIVE_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights" / "live"
"""Where the live model ships."""
STEP_FRAMES = 5
"""Frames a track advances per visual step (0.2 s at 25 fps: five updates a second)."""
DELAY_FRAMES = 6
"""How many frames a visual feature trails the newest crop (the encoder's look-ahead)."""
AUDIO_CONTEXT_FRAMES = 6
"""Frames of MFCC context each side of an audio step."""
AUDIO_STEP_FRAMES = STEP_FRAMES + 2 * AUDIO_CONTEXT_FRAMES
"""Frames of MFCC one audio step reads."""
STEPS_PER_FRAME = 4
"""MFCC steps (10 ms) per video frame (40 ms)."""
WINDOW_FRAMES = 5
"""Frames per sync window."""
FEATURES = 128

Floats = npt.NDArray[np.float32]


@dataclass(frozen=True)
class WindowHead:
    """One SyncNet-lite window head in numpy, BatchNorm folded into the window layer.

    Attributes:
        window: ``(512, 128 * 5)`` weights over a window's features (channel-major).
        shift: ``(512,)`` the folded BatchNorm shift.
        project: ``(256, 512)``.
        bias: ``(256,)``.
    """

    window: Floats
    shift: Floats
    project: Floats
    bias: Floats

    def __call__(self, features: Floats) -> Floats:
        """Per-frame features ``(T, 128)`` -> unit window embeddings ``(T - 4, 256)``."""
        count = features.shape[0] - WINDOW_FRAMES + 1
        if count <= 0:
            return np.zeros((0, self.project.shape[0]), dtype=np.float32)
        windows = np.lib.stride_tricks.sliding_window_view(features, WINDOW_FRAMES, axis=0)
        flat = windows.reshape(count, -1)  # (T-4, 128, 5) -> channel-major, as the convolution
        hidden = np.maximum(flat @ self.window.T + self.shift, 0.0)
        out = hidden @ self.project.T + self.bias
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        result: Floats = (out / np.maximum(norms, 1e-12)).astype(np.float32)
        return result


@dataclass(frozen=True)
class Gru:
    """One single-layer GRU (PyTorch's gate order r, z, n) in numpy."""

    w_ih: Floats
    w_hh: Floats
    b_ih: Floats
    b_hh: Floats

    def __call__(self, x: Floats) -> Floats:
        """``(T, in)`` -> hidden states ``(T, hidden)``, starting from zeros."""
        hidden = self.w_hh.shape[1]
        gates_in = x @ self.w_ih.T + self.b_ih
        h = np.zeros(hidden, dtype=np.float32)
        out = np.empty((x.shape[0], hidden), dtype=np.float32)
        for t in range(x.shape[0]):
            gates_h = self.w_hh @ h + self.b_hh
            r = _sigmoid(gates_in[t, :hidden] + gates_h[:hidden])
            z = _sigmoid(gates_in[t, hidden : 2 * hidden] + gates_h[hidden : 2 * hidden])
            n = np.tanh(gates_in[t, 2 * hidden :] + r * gates_h[2 * hidden :])
            h = (1.0 - z) * n + z * h
            out[t] = h
        return out


@dataclass(frozen=True)
class AsdHead:
    """Light-ASD's back-end in numpy: GRU, GELU, reversed GRU, GELU, classifier."""

    forward_gru: Gru
    backward_gru: Gru
    fc_weight: Floats
    fc_bias: Floats

    def __call__(self, audio: Floats, visual: Floats) -> Floats:
        """Features ``(T, 128)`` of the audio and of one face -> ``(T,)`` P(speaking)."""
        x = _gelu(self.forward_gru(audio + visual))
        x = _gelu(self.backward_gru(x[::-1].copy())[::-1])
        logits = x @ self.fc_weight.T + self.fc_bias
        result: Floats = _sigmoid(logits[:, 1] - logits[:, 0]).astype(np.float32)
        return result


@dataclass(frozen=True)
class LiveWeights:
    """The pieces of the live model (see the module docstring)."""

    visual_step: Path
    audio_step: Path
    video_head: WindowHead
    audio_head: WindowHead
    asd: AsdHead
    state_size: int


def load_live_weights(directory: Path = LIVE_WEIGHTS_DIR) -> LiveWeights:
    """The live model from ``directory`` (the shipped one by default).

    Raises:
        WeightsError: a file is missing or unreadable.
    """
    visual, audio, heads = (
        directory / n for n in ("visual_step.onnx", "audio_step.onnx", "heads.npz")
    )
    for path in (visual, audio, heads):
        if not path.is_file():
            raise WeightsError(f"live model incomplete: {path} is missing")
    try:
        with np.load(heads) as data:
            arrays = {k: data[k].astype(np.float32) for k in data.files}
    except (OSError, ValueError) as error:
        raise WeightsError(f"{heads}: not a readable live-model file ({error})") from None
    try:
        return LiveWeights(
            visual_step=visual,
            audio_step=audio,
            video_head=_head(arrays, "video_head"),
            audio_head=_head(arrays, "audio_head"),
            asd=AsdHead(
                forward_gru=_gru(arrays, "gru_forward"),
                backward_gru=_gru(arrays, "gru_backward"),
                fc_weight=arrays["fc.weight"],
                fc_bias=arrays["fc.bias"],
            ),
            state_size=int(arrays["state_size"].item()),
        )
    except KeyError as error:
        raise WeightsError(f"{heads}: missing {error}") from None


def _head(arrays: dict[str, Floats], name: str) -> WindowHead:
    return WindowHead(
        window=arrays[f"{name}.window"],
        shift=arrays[f"{name}.shift"],
        project=arrays[f"{name}.project"],
        bias=arrays[f"{name}.bias"],
    )


def _gru(arrays: dict[str, Floats], name: str) -> Gru:
    return Gru(
        w_ih=arrays[f"{name}.weight_ih_l0"],
        w_hh=arrays[f"{name}.weight_hh_l0"],
        b_ih=arrays[f"{name}.bias_ih_l0"],
        b_hh=arrays[f"{name}.bias_hh_l0"],
    )


def _sigmoid(x: Floats) -> Floats:
    result: Floats = (1.0 / (1.0 + np.exp(-x))).astype(np.float32)
    return result


def _gelu(x: Floats) -> Floats:
    """The exact (erf) GELU, as ``torch.nn.GELU()``."""
    result: Floats = (0.5 * x * (1.0 + _erf(x * np.float32(0.7071067811865476)))).astype(np.float32)
    return result


def _erf(x: Floats) -> Floats:
    """Erf by Abramowitz and Stegun 7.1.26 (absolute error below 1.5e-7)."""
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (
        0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429)))
    )
    result: Floats = sign * (1.0 - poly * np.exp(-a * a))
    return result
