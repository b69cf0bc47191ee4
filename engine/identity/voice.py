"""Voice features for the identity encoders, from the engine's own streaming STFT.

The PINs voice subnetwork reads the magnitude spectrogram of :class:`~engine.dsp.stft.StreamingStft`
with a Hamming window of 25 ms, a hop of 10 ms and a 512-point FFT (257 bins, 100 frames a
second), as the paper's VGGVox front end; no pre-emphasis. Two views of it:

- :func:`normalize_bins`: mean and variance normalised per frequency bin over the segment, the
  input of the from-scratch voice network (as the paper, after VGGVox).
- the raw magnitude, scaled to a fixed speech level (:func:`level_gain`), the input of the
  pretrained voice tower, whose graph squares it and applies the 40-band Slaney mel filterbank
  of :func:`slaney_mel_filterbank` to get the mel power the resemblyzer GE2E encoder was trained on.

The voice tower embeds windows of :data:`WINDOW_FRAMES` frames (1.6 s, resemblyzer's partial
utterance); a longer segment is cut into windows every :data:`WINDOW_STEP_FRAMES` frames and their
embeddings averaged (:func:`voice_windows`), so any length works, as the paper's average pooling.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from engine.dsp.stft import StftConfig, StreamingStft

VOICE_STFT = StftConfig(
    sample_rate_hz=16_000, win_s=0.025, hop_s=0.010, n_fft=512, window="hamming", preemphasis=0.0
)
"""The STFT of every voice feature: Hamming 25 ms, hop 10 ms, 512-point FFT, 16 kHz."""
N_BINS = VOICE_STFT.n_bins
FRAMES_PER_S = 100
WINDOW_FRAMES = 160
"""Frames per voice window (1.6 s)."""
WINDOW_STEP_FRAMES = 77
"""Hop between voice windows (resemblyzer's 1.3 partials a second)."""
MIN_FRAMES = 100
"""The shortest segment worth a voice embedding (1 s); shorter ones are padded by repetition."""
TARGET_DBFS = -30.0
"""Speech level the pretrained encoder expects (resemblyzer normalises its input to it)."""
N_MELS = 40

Floats = npt.NDArray[np.float32]


def spectrogram(samples: npt.NDArray[np.int16] | npt.NDArray[np.floating]) -> Floats:
    """Magnitude spectrogram ``(frames, 257)`` of 16 kHz audio (int16 or float in [-1, 1])."""
    stream = StreamingStft(VOICE_STFT)
    signal = _as_float(samples)
    head = stream.push(signal)
    return np.concatenate((head, stream.flush())).astype(np.float32)


def scaled_spectrogram(samples: npt.NDArray[np.int16]) -> Floats:
    """The voice tower's input for a stretch of speech.

    :func:`spectrogram` times :func:`level_gain`.
    """
    return spectrogram(samples) * np.float32(level_gain(samples))


def level_gain(samples: npt.NDArray[np.int16] | npt.NDArray[np.floating]) -> float:
    """The gain bringing the signal's RMS to :data:`TARGET_DBFS`.

    Never below 1 (quiet speech is raised, loud speech is kept: resemblyzer's
    ``increase_only``); 1 for digital silence.
    """
    signal = _as_float(samples)
    rms = float(np.sqrt(np.mean(np.square(signal)))) if signal.size else 0.0
    if rms <= 1e-6:
        return 1.0
    level_db = 20.0 * np.log10(rms)
    return float(max(1.0, 10.0 ** ((TARGET_DBFS - level_db) / 20.0)))


def normalize_bins(magnitude: Floats) -> Floats:
    """Mean and variance normalisation per frequency bin over time, ``(frames, bins)``."""
    mean = magnitude.mean(axis=0, keepdims=True)
    std = magnitude.std(axis=0, keepdims=True)
    normalised: Floats = ((magnitude - mean) / np.maximum(std, 1e-5)).astype(np.float32)
    return normalised


def voice_windows(magnitude: Floats) -> Floats:
    """Cut ``(frames, 257)`` into windows ``(n, 160, 257)`` every 77 frames, covering the end.

    A segment shorter than a window is repeated to fill it (a voice window must be full).
    """
    frames = len(magnitude)
    if frames == 0:
        raise ValueError("no frames to cut into voice windows")
    if frames < WINDOW_FRAMES:
        reps = -(-WINDOW_FRAMES // frames)
        return np.tile(magnitude, (reps, 1))[None, :WINDOW_FRAMES].astype(np.float32)
    starts = list(range(0, frames - WINDOW_FRAMES + 1, WINDOW_STEP_FRAMES))
    if starts[-1] + WINDOW_FRAMES < frames:
        starts.append(frames - WINDOW_FRAMES)
    return np.stack([magnitude[s : s + WINDOW_FRAMES] for s in starts]).astype(np.float32)


def slaney_mel_filterbank(
    n_mels: int = N_MELS, n_fft: int = VOICE_STFT.n_fft, sample_rate_hz: int = 16_000
) -> npt.NDArray[np.float64]:
    """The Slaney-style mel filterbank ``(n_mels, n_fft // 2 + 1)``.

    librosa's default (Slaney mel scale, area-normalised triangles from 0 Hz to Nyquist), which
    resemblyzer's mel used.
    """
    fft_hz = np.linspace(0.0, sample_rate_hz / 2, n_fft // 2 + 1)
    mel_hz = _slaney_mel_to_hz(
        np.linspace(_slaney_hz_to_mel(0.0), _slaney_hz_to_mel(sample_rate_hz / 2), n_mels + 2)
    )
    widths = np.diff(mel_hz)
    ramps = mel_hz[:, None] - fft_hz[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    bank = np.maximum(0.0, np.minimum(lower, upper))
    return np.asarray(bank * (2.0 / (mel_hz[2:] - mel_hz[:-2]))[:, None])


def _slaney_hz_to_mel(hz: float | npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / (200.0 / 3)
    log_part = 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) / (np.log(6.4) / 27.0)
    return np.asarray(np.where(hz >= 1000.0, log_part, linear))


def _slaney_mel_to_hz(mel: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    linear = mel * (200.0 / 3)
    log_part = 1000.0 * np.exp((np.log(6.4) / 27.0) * (mel - 15.0))
    return np.asarray(np.where(mel >= 15.0, log_part, linear))


def _as_float(samples: npt.NDArray[np.int16] | npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
    if samples.dtype == np.int16:
        return samples.astype(np.float64) / 32768.0
    return samples.astype(np.float64)
