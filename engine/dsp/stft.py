"""Stateful sliding STFT in Numba: pre-emphasis, framing with overlap, window, real FFT.

The streaming classes keep the tail of the signal between calls, so feeding audio in chunks of
any size gives the same frames as one call over the whole signal (chunk-invariance). The end of
a stream is explicit: :meth:`StreamingStft.flush` zero-pads the last partial frame exactly as
python_speech_features' ``framesig`` does, so a batch call is ``push(all)`` then ``flush()``.

The FFT inside the kernels is pocketfft, made callable from ``@njit`` code by rocket-fft; the
kernels run frames in small blocks so the working set stays in cache.

Thread affinity: a streaming object is not thread-safe; the kernels release the GIL.
"""

from __future__ import annotations

import decimal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import rocket_fft  # noqa: F401  (registers np.fft for @njit code)
from numba import njit

from engine.core.errors import UsageError

BLOCK_FRAMES = 32
"""Frames per FFT call inside the kernels: large enough to amortise the call, small for cache."""

Samples = npt.NDArray[Any]
Span = tuple[npt.NDArray[np.float64], float, float, int]
"""What a kernel reads: raw samples, the raw sample before them, the pre-emphasis coefficient,
and how many samples are real (the rest, up to the buffer's end, is end-of-stream padding)."""


def round_half_up(value: float) -> int:
    """Round .5 up, as python_speech_features does for window and hop lengths."""
    return int(decimal.Decimal(value).quantize(decimal.Decimal("1"), decimal.ROUND_HALF_UP))


def make_window(name: str, length: int) -> npt.NDArray[np.float64]:
    """A symmetric analysis window as numpy builds it.

    Args:
        name: ``hamming`` (default of our own models), ``hann``, ``blackman`` or
            ``rectangular`` (what SyncNet's features used: no window at all).
        length: samples.

    Raises:
        UsageError: an unknown window name.
    """
    makers: dict[str, Callable[[int], npt.NDArray[np.float64]]] = {
        "hamming": np.hamming,
        "hann": np.hanning,
        "blackman": np.blackman,
        "rectangular": np.ones,
    }
    if name not in makers:
        raise UsageError(f"unknown window {name!r}; choose one of {sorted(makers)}")
    return np.asarray(makers[name](length), dtype=np.float64)


@dataclass(frozen=True)
class StftConfig:
    """How the signal is cut into frames and transformed.

    Attributes:
        sample_rate_hz: input sample rate.
        win_s: window length in seconds (rounded half up to samples).
        hop_s: hop between frame starts in seconds (rounded half up to samples).
        n_fft: FFT size; frames are zero-padded to it. Must be at least the window length.
        window: window name, see :func:`make_window`.
        preemphasis: coefficient of ``y[n] = x[n] - a * x[n-1]``; 0 disables it.
    """

    sample_rate_hz: int = 16_000
    win_s: float = 0.025
    hop_s: float = 0.010
    n_fft: int = 512
    window: str = "hamming"
    preemphasis: float = 0.97

    @property
    def win_length(self) -> int:
        """Window length in samples."""
        return round_half_up(self.win_s * self.sample_rate_hz)

    @property
    def hop_length(self) -> int:
        """Hop in samples."""
        return round_half_up(self.hop_s * self.sample_rate_hz)

    @property
    def n_bins(self) -> int:
        """Frequency bins of the one-sided spectrum: ``n_fft // 2 + 1``."""
        return self.n_fft // 2 + 1

    def validate(self) -> None:
        """Raise :class:`UsageError` unless the lengths are consistent."""
        if self.sample_rate_hz <= 0 or self.win_length < 1 or self.hop_length < 1:
            raise UsageError(f"STFT needs positive rate, window and hop: {self}")
        if self.n_fft < self.win_length:
            raise UsageError(f"n_fft {self.n_fft} is shorter than the window {self.win_length}")
        make_window(self.window, self.win_length)


@njit(cache=True, nogil=True)
def _fft_block(
    span: Span,
    first: int,
    count: int,
    hop: int,
    window: npt.NDArray[np.float64],
    scratch: npt.NDArray[np.float64],
) -> npt.NDArray[np.complex128]:
    """FFT of ``count`` pre-emphasised, windowed frames from frame ``first`` of the span.

    Pre-emphasis is applied here, on the fly, so the signal is never copied whole; samples at
    or past ``valid`` are the zero padding of the stream's end (zero after pre-emphasis, as
    python_speech_features pads). ``scratch`` rows are zero past the window.
    """
    buf, previous, coeff, valid = span
    win = window.size
    for j in range(count):
        offset = (first + j) * hop
        for k in range(win):
            index = offset + k
            if index >= valid:
                scratch[j, k] = 0.0
                continue
            before = buf[index - 1] if index > 0 else previous
            scratch[j, k] = (buf[index] - coeff * before) * window[k]
    return np.fft.rfft(scratch[:count])


@njit(cache=True, nogil=True)
def _spectrum_kernel(
    span: Span,
    n_frames: int,
    hop: int,
    window: npt.NDArray[np.float64],
    n_fft: int,
    power: bool,
    out: npt.NDArray[np.float64],
) -> None:
    """Write the power (``|X|^2 / n_fft``) or magnitude spectrum of each frame into ``out``."""
    scratch = np.zeros((BLOCK_FRAMES, n_fft))
    scale = 1.0 / n_fft
    for first in range(0, n_frames, BLOCK_FRAMES):
        count = min(BLOCK_FRAMES, n_frames - first)
        spec = _fft_block(span, first, count, hop, window, scratch)
        for j in range(count):
            for k in range(spec.shape[1]):
                c = spec[j, k]
                squared = c.real * c.real + c.imag * c.imag
                out[first + j, k] = squared * scale if power else np.sqrt(squared)


class Framer:
    """Overlap and pre-emphasis state shared by every streaming front-end.

    It holds the samples that later frames still need and knows how many frames the whole stream
    will have once it ends (python_speech_features' rule: one frame for a signal no longer than
    the window, else ``1 + ceil((n - win) / hop)``, the last one zero-padded).
    """

    def __init__(self, config: StftConfig) -> None:
        """Start an empty stream with ``config``."""
        config.validate()
        self.config = config
        self.win = config.win_length
        self.hop = config.hop_length
        self.reset()

    def reset(self) -> None:
        """Forget the stream: the next push starts a new one."""
        self._pending = np.zeros(0, dtype=np.float64)
        self._previous = 0.0
        self.samples_in = 0
        self.frames_out = 0

    def push(self, samples: Samples) -> tuple[Span, int]:
        """Take new samples; return the span that starts at the next frame and its frame count.

        Raises:
            UsageError: ``samples`` is not a 1-D array of numbers.
        """
        signal = _as_signal(samples)
        self.samples_in += signal.size
        buf = np.concatenate((self._pending, signal)) if self._pending.size else signal
        ready = 0 if buf.size < self.win else (buf.size - self.win) // self.hop + 1
        span = (buf, self._previous, self.config.preemphasis, buf.size)
        consumed = ready * self.hop
        if consumed:
            self._previous = float(buf[consumed - 1])
        self._pending = buf[consumed:].copy()
        self.frames_out += ready
        return span, ready

    def finish(self) -> tuple[Span, int]:
        """End the stream: return the span of the frames still owed (zero-padded), then reset."""
        owed = self.total_frames(self.samples_in) - self.frames_out
        needed = (owed - 1) * self.hop + self.win if owed > 0 else 0
        buf = np.zeros(max(needed, self._pending.size))
        buf[: self._pending.size] = self._pending
        span = (buf, self._previous, self.config.preemphasis, self._pending.size)
        self.reset()
        return span, owed

    def total_frames(self, n_samples: int) -> int:
        """Frames of a whole stream of ``n_samples`` (0 for an empty stream)."""
        if n_samples == 0:
            return 0
        if n_samples <= self.win:
            return 1
        return 1 + -(-(n_samples - self.win) // self.hop)


def _as_signal(samples: Samples) -> npt.NDArray[np.float64]:
    array = np.asarray(samples)
    if array.ndim != 1 or not (
        np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    ):
        raise UsageError(
            f"audio must be a 1-D array of samples, got shape {array.shape} {array.dtype}"
        )
    return array.astype(np.float64, copy=False)


class FramedStream:
    """What every streaming front-end shares: push chunks, get the frames they complete.

    Subclasses set ``_framer`` and ``_window`` and implement ``_run``, the kernel call.
    """

    _framer: Framer
    _window: npt.NDArray[np.float64]

    @property
    def frames_out(self) -> int:
        """Frames emitted since the stream started."""
        return self._framer.frames_out

    @property
    def hop_length(self) -> int:
        """Samples between frame starts."""
        return self._framer.hop

    def reset(self) -> None:
        """Drop all state; the next push starts a new stream."""
        self._framer.reset()

    def push(self, samples: Samples) -> npt.NDArray[np.float64]:
        """Add samples; return the frames they completed, ``(frames, features)`` float64.

        Raises:
            UsageError: ``samples`` is not a 1-D numeric array.
        """
        return self._run(*self._framer.push(samples))

    def flush(self) -> npt.NDArray[np.float64]:
        """End the stream: return the zero-padded final frames, then start afresh."""
        return self._run(*self._framer.finish())

    def _run(self, span: Span, n_frames: int) -> npt.NDArray[np.float64]:
        raise NotImplementedError


class StreamingStft(FramedStream):
    """Sliding STFT with state: push chunks of any size, get every completed frame.

    Args:
        config: framing and window; the default is Hamming 25 ms / 10 ms / 512 at 16 kHz.
        power: True for ``|X|^2 / n_fft`` (python_speech_features' ``powspec``), False for the
            magnitude ``|X|``.
    """

    def __init__(self, config: StftConfig | None = None, *, power: bool = False) -> None:
        """See the class docstring."""
        self.config = config or StftConfig()
        self.power = power
        self._framer = Framer(self.config)
        self._window = make_window(self.config.window, self.config.win_length)

    def _run(self, span: Span, n_frames: int) -> npt.NDArray[np.float64]:
        out = np.empty((n_frames, self.config.n_bins))
        if n_frames:
            _spectrum_kernel(
                span, n_frames, self._framer.hop, self._window, self.config.n_fft, self.power, out
            )
        return out


def stft(
    signal: Samples, config: StftConfig | None = None, *, power: bool = False
) -> npt.NDArray[np.float64]:
    """Spectrogram of a whole signal, ``(frames, n_fft // 2 + 1)``: ``push`` then ``flush``."""
    stream = StreamingStft(config, power=power)
    head = stream.push(signal)
    return np.concatenate((head, stream.flush()))
