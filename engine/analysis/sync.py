"""Audio-visual sync from SyncNet embeddings: offset, LSE-D, LSE-C and framewise confidence.

Pure numpy, no awaits: the same functions serve the offline ``sync`` pipeline and the live one.
The numbers are those of joonson/syncnet_python's ``SyncNetInstance.evaluate`` (``calc_pdist``
and the lines after it), vectorised over frames and computed in float64:

- ``dists[i, j] = || video[i] - audio_padded[i + j] + eps ||_2`` with ``audio_padded`` the audio
  embeddings with ``max_shift`` zero rows added at both ends and ``eps = 1e-6`` added to every
  component of the difference, as ``torch.nn.functional.pairwise_distance`` does;
- ``mean_dists = mean over frames``; ``min_dist`` (LSE-D) and its first index ``j*``;
- ``offset = max_shift - j*``; ``confidence`` (LSE-C) ``= median(mean_dists) - min_dist``;
- framewise confidence ``= median(mean_dists) - dists[:, j*]``, then a 9-tap median filter with
  zero padding at the ends (``scipy.signal.medfilt(x, 9)``).

The reference runs in float32 on torch; float64 here differs from it by float32 rounding only
(about 1e-6 relative). ``2 * max_shift + 1`` is odd, so ``median`` is the middle value and the
lower-median rule of ``torch.median`` never comes into play.

Sign convention: a positive offset means the sound comes before the lips (audio leads), as
syncnet_python's "AV offset", ITU-R BT.1359 and EBU R37 use it. From the formula above, column
``j`` compares ``video[i]`` with ``audio[i + j - max_shift]`` = ``audio[i - offset]``: the best
offset ``k`` is the one for which the audio of frame ``i - k`` matches the picture of frame
``i``, i.e. the sound of what the lips do at frame ``i`` was heard ``k`` frames earlier. Audio
delayed by ``k`` frames against the video therefore reads ``-k``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import sliding_window_view

PAIRWISE_EPS = 1e-6
"""Added to every component of ``video - audio`` before the norm (torch ``pairwise_distance``)."""

DEFAULT_MAX_SHIFT = 15
"""Shifts searched on each side, in frames (syncnet_python's ``--vshift`` default)."""

FRAMEWISE_KERNEL = 9
"""Length of the median filter over framewise confidence, in frames (syncnet_python)."""


@dataclass(frozen=True, eq=False)
class SyncEstimate:
    """The sync of one face track against one audio stream, over a run of frames.

    Arrays are read-only. Instances compare by identity (they hold arrays).

    Attributes:
        offset_frames: the best shift in video frames; positive = audio leads the lips.
        offset_ms: ``offset_frames`` in milliseconds at ``fps``.
        min_dist: LSE-D, the mean distance at the best shift (lower = better sync).
        confidence: LSE-C, ``median(mean_dists) - min_dist`` (higher = more certain).
        frames: how many embedding pairs (video frames) the estimate is over.
        max_shift: shifts searched on each side, in frames.
        fps: the video frame rate used for ``offset_ms``.
        mean_dists: ``(2 * max_shift + 1,)`` mean distance per shift, in the reference's column
            order: column ``j`` is offset ``max_shift - j`` (see :attr:`offsets_frames`).
        framewise_confidence: ``(frames,)`` per-frame confidence at the best shift, median
            filtered over :data:`FRAMEWISE_KERNEL` frames.
    """

    offset_frames: int
    offset_ms: float
    min_dist: float
    confidence: float
    frames: int
    max_shift: int
    fps: float
    mean_dists: npt.NDArray[np.float64]
    framewise_confidence: npt.NDArray[np.float64]

    @property
    def offsets_frames(self) -> npt.NDArray[np.int64]:
        """``(2 * max_shift + 1,)`` the offset of each column of :attr:`mean_dists`."""
        return np.arange(self.max_shift, -self.max_shift - 1, -1, dtype=np.int64)


def _check_embeddings(
    video_emb: npt.ArrayLike, audio_emb: npt.ArrayLike, max_shift: int, audio_lead: int = 0
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], int]:
    if isinstance(max_shift, bool) or not isinstance(max_shift, int | np.integer):
        raise TypeError(f"max_shift must be an int, got {type(max_shift).__name__}")
    shift = int(max_shift)
    if shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {shift}")
    video = np.asarray(video_emb, dtype=np.float64)
    audio = np.asarray(audio_emb, dtype=np.float64)
    if video.ndim != 2 or audio.ndim != 2:
        raise ValueError(
            f"embeddings must be (frames, dim), got video {video.shape} and audio {audio.shape}"
        )
    extra = audio.shape[0] - video.shape[0]
    if video.shape[1] != audio.shape[1] or not 0 <= audio_lead <= min(extra, shift):
        raise ValueError(
            f"video and audio embeddings differ in shape: {video.shape} vs {audio.shape} "
            f"(audio_lead {audio_lead}, max_shift {shift})"
        )
    if extra - audio_lead > shift:
        raise ValueError(f"audio has {extra - audio_lead} rows after the run; at most {shift}")
    if video.shape[0] == 0 or video.shape[1] == 0:
        raise ValueError(f"embeddings are empty: {video.shape}")
    if not (np.isfinite(video).all() and np.isfinite(audio).all()):
        raise ValueError("embeddings contain NaN or infinity")
    return video, audio, shift


def pairwise_shift_distances(
    video_emb: npt.ArrayLike, audio_emb: npt.ArrayLike, max_shift: int = DEFAULT_MAX_SHIFT
) -> npt.NDArray[np.float64]:
    """Distances between each video embedding and the audio embeddings around it.

    Column ``j`` of row ``i`` is ``|| video[i] - audio[i + j - max_shift] + 1e-6 ||_2``, where an
    audio index outside ``[0, frames)`` reads as a zero vector (the reference pads with zeros).

    Args:
        video_emb: ``(frames, dim)`` lip embeddings, one per video frame.
        audio_emb: ``(frames, dim)`` audio embeddings on the same frame grid.
        max_shift: shifts searched on each side, in frames; at least 0.

    Returns:
        ``(frames, 2 * max_shift + 1)`` float64 distances; column ``j`` is offset
        ``max_shift - j`` (positive = audio leads).

    Raises:
        ValueError: shapes differ, are not 2-D or are empty; NaN or infinity in the input;
            ``max_shift < 0``.
        TypeError: ``max_shift`` is not an int.
    """
    video, audio, shift = _check_embeddings(video_emb, audio_emb, max_shift)
    return _shift_distances(video, audio, shift)


def _shift_distances(
    video: npt.NDArray[np.float64],
    audio: npt.NDArray[np.float64],
    max_shift: int,
    audio_lead: int = 0,
) -> npt.NDArray[np.float64]:
    frames, dim = video.shape
    width = 2 * max_shift + 1
    padded = np.zeros((frames + 2 * max_shift, dim), dtype=np.float64)
    start = max_shift - audio_lead
    padded[start : start + audio.shape[0]] = audio
    # One (frames, dim) difference per shift keeps memory at O(frames * dim), where broadcasting
    # all shifts at once would need width times that (GBs for a long clip at dim 1024).
    dists = np.empty((frames, width), dtype=np.float64)
    diff = np.empty((frames, dim), dtype=np.float64)
    for j in range(width):
        np.subtract(video, padded[j : j + frames], out=diff)
        diff += PAIRWISE_EPS
        np.sqrt(np.einsum("td,td->t", diff, diff), out=dists[:, j])
    return dists


def lip_match(
    video_emb: npt.ArrayLike,
    audio_emb: npt.ArrayLike,
    *,
    before: int = DEFAULT_MAX_SHIFT,
    after: int = 2,
    near: int = 1,
) -> float:
    """How well a run of lips fits the sound at about zero offset, for choosing the speaker.

    The mean distance over the run is taken at every audio shift ``-before..+after`` (video row
    ``i`` against audio row ``before + i + s``); the match is the median of those means minus the
    smallest within ``±near`` of zero: LSE-C measured at sync rather than at the best shift.
    Lips that fit the sound score high, other lips near 0. Unlike :func:`estimate_sync`, it
    needs only ``after`` frames of sound past the lips, so a live engine can answer "who is
    speaking" without waiting for the whole shift range of future audio.

    Args:
        video_emb: ``(frames, dim)`` lip embeddings of consecutive windows.
        audio_emb: ``(before + frames + after, dim)`` audio embeddings; row ``before + i``
            pairs with ``video_emb[i]``.
        before: shifts towards earlier sound, at least ``near``.
        after: shifts towards later sound, at least ``near``.
        near: the shifts that count as in sync, each side of zero.

    Raises:
        ValueError: shapes do not fit, or a shift count is out of range.
    """
    video = np.asarray(video_emb, dtype=np.float64)
    audio = np.asarray(audio_emb, dtype=np.float64)
    if not 0 <= near <= min(before, after):
        raise ValueError(f"near must be within 0..min(before, after), got {near}")
    if video.ndim != 2 or video.shape[0] == 0 or audio.ndim != 2:
        raise ValueError(f"embeddings must be 2-D and not empty: {video.shape}, {audio.shape}")
    frames = video.shape[0]
    if audio.shape != (before + frames + after, video.shape[1]):
        raise ValueError(
            f"audio must be {(before + frames + after, video.shape[1])} for {frames} frames, "
            f"{before} before and {after} after, got {audio.shape}"
        )
    reach = max(before, after)  # columns reach - before .. reach + after read real sound
    dists = _shift_distances(video, audio, reach, audio_lead=before)
    means = dists[:, reach - before : reach + after + 1].mean(axis=0)
    return float(np.median(means) - means[before - near : before + near + 1].min())


def medfilt(x: npt.ArrayLike, kernel_size: int = FRAMEWISE_KERNEL) -> npt.NDArray[np.float64]:
    """Median filter of a 1-D signal with zero padding, as ``scipy.signal.medfilt`` computes it.

    Args:
        x: ``(n,)`` the signal.
        kernel_size: window length in samples; odd and positive. A window longer than the
            signal is fine (scipy warns, this does not): the zeros take part in the median.

    Returns:
        ``(n,)`` float64: element ``i`` is the median of ``x[i - k//2 : i + k//2 + 1]``, with
        zeros where that range leaves the signal.

    Raises:
        ValueError: ``x`` is not 1-D, or ``kernel_size`` is not odd and positive.
    """
    signal = np.asarray(x, dtype=np.float64)
    if signal.ndim != 1:
        raise ValueError(f"medfilt takes a 1-D signal, got shape {signal.shape}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
    half = kernel_size // 2
    padded = np.pad(signal, half)
    windows = sliding_window_view(padded, kernel_size)
    result: npt.NDArray[np.float64] = np.median(windows, axis=1)
    return result


def estimate_sync(
    video_emb: npt.ArrayLike,
    audio_emb: npt.ArrayLike,
    *,
    max_shift: int = DEFAULT_MAX_SHIFT,
    fps: float = 25.0,
    audio_lead: int = 0,
) -> SyncEstimate:
    """Estimate the audio-video offset and the sync scores over a run of frames.

    With ``audio_emb`` as long as ``video_emb`` and ``audio_lead=0`` this is syncnet_python's
    computation exactly: shifts that reach past the run compare with zero vectors. A caller that
    has the sound around the run passes it instead: ``audio_emb`` may hold up to ``max_shift``
    extra rows on each side, ``audio_lead`` of them before the row that pairs with
    ``video_emb[0]``; only shifts that reach past those read zeros. That matters for models
    whose embeddings are unit vectors (SyncNet-lite): a zero vector is closer to any of them
    than a typical mismatched embedding, so zero padding would pull short runs towards large
    shifts.

    Sign: a positive ``offset_frames`` means the sound comes before the lips (audio leads), the
    sign of syncnet_python's "AV offset", ITU-R BT.1359 and EBU R37. If ``audio_emb[i + k]`` is
    the audio of what ``video_emb[i]`` shows (the audio track is delayed by ``k`` frames), the
    estimate is ``-k``.

    Args:
        video_emb: ``(frames, dim)`` lip embeddings, one per video frame.
        audio_emb: ``(frames + extra, dim)`` audio embeddings on the same frame grid.
        max_shift: shifts searched on each side, in frames; at least 0.
        fps: video frame rate, for ``offset_ms``; positive.
        audio_lead: rows of ``audio_emb`` before the one that pairs with ``video_emb[0]``.

    Returns:
        The estimate; ties between shifts resolve to the first column (the most positive
        offset), as ``torch.min`` and ``numpy.argmin`` do.

    Raises:
        ValueError: shapes differ, are not 2-D or are empty; NaN or infinity in the input;
            ``max_shift < 0``; ``fps`` not positive.
        TypeError: ``max_shift`` is not an int.
    """
    if not (fps > 0 and np.isfinite(fps)):
        raise ValueError(f"fps must be positive, got {fps}")
    video, audio, shift = _check_embeddings(video_emb, audio_emb, max_shift, audio_lead)
    dists = _shift_distances(video, audio, shift, audio_lead)
    mean_dists = dists.mean(axis=0)
    best = int(np.argmin(mean_dists))
    min_dist = float(mean_dists[best])
    median = float(np.median(mean_dists))
    offset = shift - best
    framewise = medfilt(median - dists[:, best], FRAMEWISE_KERNEL)
    _freeze(mean_dists, framewise)
    return SyncEstimate(
        offset_frames=offset,
        offset_ms=offset * 1000.0 / fps,
        min_dist=min_dist,
        confidence=median - min_dist,
        frames=int(video.shape[0]),
        max_shift=shift,
        fps=float(fps),
        mean_dists=mean_dists,
        framewise_confidence=framewise,
    )


def _freeze(*arrays: npt.NDArray[Any]) -> None:
    for array in arrays:
        array.flags.writeable = False
