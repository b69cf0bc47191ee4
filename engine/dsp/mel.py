"""Mel scale and the triangular mel filterbank, built exactly as python_speech_features builds it.

The filterbank is stored sparsely for the Numba kernels: each triangular filter spans a short
run of FFT bins, so applying it costs about two multiply-adds per bin instead of ``n_filters``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


def hz_to_mel(hz: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """HTK mel scale: ``2595 * log10(1 + hz / 700)``."""
    return np.asarray(2595.0 * np.log10(1.0 + np.asarray(hz, dtype=np.float64) / 700.0))


def mel_to_hz(mel: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Inverse of :func:`hz_to_mel`."""
    return np.asarray(700.0 * (10.0 ** (np.asarray(mel, dtype=np.float64) / 2595.0) - 1.0))


def mel_filterbank(
    n_filters: int, n_fft: int, sample_rate_hz: int, low_hz: float, high_hz: float
) -> npt.NDArray[np.float64]:
    """Triangular filters on FFT bins placed evenly on the mel scale.

    Bin edges are ``floor((n_fft + 1) * hz / sample_rate_hz)`` of ``n_filters + 2`` mel-spaced
    points, as python_speech_features' ``get_filterbanks`` computes them (so features match the
    ones SyncNet and Light-ASD were trained on).

    Returns:
        Weights of shape ``(n_filters, n_fft // 2 + 1)``.
    """
    mel_points = np.linspace(hz_to_mel(low_hz), hz_to_mel(high_hz), n_filters + 2)
    bins = np.floor((n_fft + 1) * mel_to_hz(mel_points) / sample_rate_hz)
    bank = np.zeros((n_filters, n_fft // 2 + 1))
    for j in range(n_filters):
        left, centre, right = int(bins[j]), int(bins[j + 1]), int(bins[j + 2])
        for i in range(left, centre):
            bank[j, i] = (i - bins[j]) / (bins[j + 1] - bins[j])
        for i in range(centre, right):
            bank[j, i] = (bins[j + 2] - i) / (bins[j + 2] - bins[j + 1])
    return bank


@dataclass(frozen=True)
class SparseFilterbank:
    """A filterbank as runs of non-zero weights, the layout the Numba kernels read.

    Attributes:
        starts: first bin of each filter, shape ``(n_filters,)``.
        lengths: number of bins of each filter, shape ``(n_filters,)``.
        weights: the run of weights of each filter, zero-padded, ``(n_filters, max_length)``.
    """

    starts: npt.NDArray[np.int64]
    lengths: npt.NDArray[np.int64]
    weights: npt.NDArray[np.float64]

    @classmethod
    def from_dense(cls, bank: npt.NDArray[np.float64]) -> SparseFilterbank:
        """Pack a dense ``(n_filters, n_bins)`` bank; zeros inside a run are kept."""
        n_filters = bank.shape[0]
        starts = np.zeros(n_filters, dtype=np.int64)
        lengths = np.zeros(n_filters, dtype=np.int64)
        for j in range(n_filters):
            nonzero = np.flatnonzero(bank[j])
            if nonzero.size:
                starts[j] = nonzero[0]
                lengths[j] = nonzero[-1] + 1 - nonzero[0]
        weights = np.zeros((n_filters, max(1, int(lengths.max(initial=0)))))
        for j in range(n_filters):
            weights[j, : lengths[j]] = bank[j, starts[j] : starts[j] + lengths[j]]
        return cls(starts=starts, lengths=lengths, weights=weights)
