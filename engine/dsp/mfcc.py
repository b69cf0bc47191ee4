"""MFCC: streaming STFT -> power -> mel filterbank -> log -> DCT-II -> lifter, fused in Numba.

Two presets:

- ``syncnet``: exactly ``python_speech_features.mfcc(signal, 16000)`` with its defaults (25 ms
  window, 10 ms hop, 13 cepstra, 26 filters, nfft 512, pre-emphasis 0.97, lifter 22, c0 replaced
  by the log frame energy, *rectangular* window). The published SyncNet and Light-ASD weights
  were trained on these features. Give it int16-scaled samples, as those models saw.
- ``hamming``: the same with a Hamming window, for our own models.

Frames are 10 ms apart, so one 25 fps video frame spans exactly 4 MFCC steps.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt
from numba import njit

from engine.core.errors import UsageError
from engine.dsp.mel import SparseFilterbank, mel_filterbank
from engine.dsp.stft import (
    BLOCK_FRAMES,
    FramedStream,
    Framer,
    Span,
    StftConfig,
    _fft_block,
    make_window,
)


@dataclass(frozen=True)
class MfccPreset:
    """Everything that defines an MFCC front-end.

    Attributes:
        stft: framing, window, FFT size and pre-emphasis.
        n_filters: mel filters.
        n_ceps: cepstra kept.
        lifter: sinusoidal lifter ``1 + L/2 sin(pi n / L)``; 0 disables it.
        append_energy: replace c0 by the log of the frame's total power.
        low_hz: lowest filter edge.
        high_hz: highest filter edge; None means the Nyquist frequency.
    """

    stft: StftConfig
    n_filters: int = 26
    n_ceps: int = 13
    lifter: int = 22
    append_energy: bool = True
    low_hz: float = 0.0
    high_hz: float | None = None

    def at_rate(self, sample_rate_hz: int) -> MfccPreset:
        """The same preset for another sample rate (window and hop stay in seconds)."""
        return replace(self, stft=replace(self.stft, sample_rate_hz=sample_rate_hz))


PRESETS: dict[str, MfccPreset] = {
    "syncnet": MfccPreset(stft=StftConfig(window="rectangular")),
    "hamming": MfccPreset(stft=StftConfig(window="hamming")),
}


def get_preset(preset: str | MfccPreset, sample_rate_hz: int | None = None) -> MfccPreset:
    """Resolve a preset name, optionally at another sample rate.

    Raises:
        UsageError: an unknown preset name.
    """
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise UsageError(f"unknown MFCC preset {preset!r}; choose one of {sorted(PRESETS)}")
        preset = PRESETS[preset]
    if sample_rate_hz is not None and sample_rate_hz != preset.stft.sample_rate_hz:
        preset = preset.at_rate(sample_rate_hz)
    return preset


def dct_matrix(n_inputs: int, n_outputs: int) -> npt.NDArray[np.float64]:
    """Orthonormal DCT-II as an ``(n_inputs, n_outputs)`` matrix: right-multiply to transform."""
    n = np.arange(n_inputs)[:, None]
    k = np.arange(n_outputs)[None, :]
    basis = np.cos(np.pi * k * (2 * n + 1) / (2 * n_inputs)) * np.sqrt(2.0 / n_inputs)
    basis[:, 0] *= np.sqrt(0.5)
    return np.ascontiguousarray(basis)


def lifter_weights(n_ceps: int, lifter: int) -> npt.NDArray[np.float64]:
    """Sinusoidal lifter ``1 + L/2 sin(pi n / L)``, or ones when ``lifter`` is 0."""
    if lifter <= 0:
        return np.ones(n_ceps)
    return 1.0 + (lifter / 2.0) * np.sin(np.pi * np.arange(n_ceps) / lifter)


@njit(cache=True, nogil=True)
def _mfcc_kernel(
    span: Span,
    n_frames: int,
    hop: int,
    window: npt.NDArray[np.float64],
    n_fft: int,
    fb_starts: npt.NDArray[np.int64],
    fb_lengths: npt.NDArray[np.int64],
    fb_weights: npt.NDArray[np.float64],
    dct: npt.NDArray[np.float64],
    lift: npt.NDArray[np.float64],
    append_energy: bool,
    out: npt.NDArray[np.float64],
) -> None:
    """Fused MFCC of ``n_frames`` frames of ``buf`` into ``out`` ``(n_frames, n_ceps)``."""
    n_filters, n_ceps = dct.shape
    scratch = np.zeros((BLOCK_FRAMES, n_fft))
    power = np.empty(n_fft // 2 + 1)
    log_mel = np.empty(n_filters)
    eps = np.finfo(np.float64).eps
    scale = 1.0 / n_fft
    for first in range(0, n_frames, BLOCK_FRAMES):
        count = min(BLOCK_FRAMES, n_frames - first)
        spec = _fft_block(span, first, count, hop, window, scratch)
        for j in range(count):
            energy = 0.0
            for k in range(power.size):
                c = spec[j, k]
                power[k] = (c.real * c.real + c.imag * c.imag) * scale
                energy += power[k]
            for f in range(n_filters):
                total = 0.0
                start = fb_starts[f]
                for t in range(fb_lengths[f]):
                    total += power[start + t] * fb_weights[f, t]
                log_mel[f] = np.log(total if total != 0.0 else eps)
            row = first + j
            for c_index in range(n_ceps):
                acc = 0.0
                for f in range(n_filters):
                    acc += log_mel[f] * dct[f, c_index]
                out[row, c_index] = acc * lift[c_index]
            if append_energy:
                out[row, 0] = np.log(energy if energy != 0.0 else eps)


class StreamingMfcc(FramedStream):
    """Chunk-invariant streaming MFCC: push audio of any chunk size, get completed frames.

    ``push(a); push(b); flush()`` returns, concatenated, the same array as ``mfcc(a + b)``.

    Args:
        preset: a name from :data:`PRESETS` or a :class:`MfccPreset`.
        sample_rate_hz: rate of the samples pushed (the engine always feeds 16 kHz).

    Thread affinity: not thread-safe; the kernel releases the GIL, so an executor may run it.
    """

    def __init__(self, preset: str | MfccPreset = "syncnet", sample_rate_hz: int = 16_000) -> None:
        """See the class docstring."""
        self.preset = get_preset(preset, sample_rate_hz)
        stft = self.preset.stft
        self._framer = Framer(stft)
        self._window = make_window(stft.window, stft.win_length)
        high_hz = self.preset.high_hz or stft.sample_rate_hz / 2
        dense = mel_filterbank(
            self.preset.n_filters, stft.n_fft, stft.sample_rate_hz, self.preset.low_hz, high_hz
        )
        self._bank = SparseFilterbank.from_dense(dense)
        self._dct = dct_matrix(self.preset.n_filters, self.preset.n_ceps)
        self._lift = lifter_weights(self.preset.n_ceps, self.preset.lifter)

    def _run(self, span: Span, n_frames: int) -> npt.NDArray[np.float64]:
        out = np.empty((n_frames, self.preset.n_ceps))
        if n_frames:
            _mfcc_kernel(
                span,
                n_frames,
                self._framer.hop,
                self._window,
                self.preset.stft.n_fft,
                self._bank.starts,
                self._bank.lengths,
                self._bank.weights,
                self._dct,
                self._lift,
                self.preset.append_energy,
                out,
            )
        return out


def mfcc(
    signal: npt.NDArray[np.generic], sample_rate: int, preset: str = "syncnet"
) -> npt.NDArray[np.float64]:
    """MFCC of a whole signal.

    Args:
        signal: 1-D samples, ``(samples,)``; int16 or float, used at the scale given.
        sample_rate: samples per second of ``signal``.
        preset: ``syncnet`` (python_speech_features' defaults) or ``hamming``.

    Returns:
        ``(frames, 13)`` float64, one row per 10 ms hop; ``(0, 13)`` for an empty signal.

    Raises:
        UsageError: an unknown preset or a signal that is not 1-D numeric.
    """
    stream = StreamingMfcc(preset, sample_rate)
    head = stream.push(signal)
    return np.concatenate((head, stream.flush()))
