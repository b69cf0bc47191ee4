"""Pairing video and audio on timestamps: 5-frame crop windows with their 20-step MFCC windows.

At 25 fps and a 10 ms MFCC hop, video frame ``i`` (at ``pts``) pairs with the MFCC frames whose
analysis windows start at ``pts, pts + 10 ms, ..., pts + 190 ms``: exactly what syncnet_python
does with ``mfcc[4 i : 4 i + 20]``, but on timestamps rather than on array positions, so that
clips whose audio starts before or after the picture pair correctly. Pure functions, no awaits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

VIDEO_FRAMES = 5
MFCC_STEPS = 20
FRAME_NS = 40_000_000
HOP_NS = 10_000_000


@dataclass(frozen=True)
class PairedWindows:
    """Windows that have both their pictures and their sound.

    Attributes:
        starts: index (into the track's frames) of each window's first frame ``(n,)``.
        pts_ns: timestamp of each window's first frame ``(n,)``.
        audio: MFCC windows ``(n, 13, 20)`` float32 (cepstra × time, SyncNet's layout).
        steps: index (into the MFCC frames) of each window's first MFCC step ``(n,)``.
    """

    starts: npt.NDArray[np.int64]
    pts_ns: npt.NDArray[np.int64]
    audio: npt.NDArray[np.float32]
    steps: npt.NDArray[np.int64]


def pair_windows(
    frame_pts_ns: npt.NDArray[np.int64],
    mfcc: npt.NDArray[np.floating],
    mfcc_start_ns: int,
    *,
    hop_ns: int = HOP_NS,
    frame_ns: int = FRAME_NS,
    video_frames: int = VIDEO_FRAMES,
    mfcc_steps: int = MFCC_STEPS,
) -> PairedWindows:
    """Every window of ``video_frames`` consecutive frames whose MFCC window lies in ``mfcc``.

    Args:
        frame_pts_ns: timestamps of a track's frames ``(T,)``, increasing, on the 25 fps grid.
        mfcc: the stream's MFCC frames ``(N, 13)``, one every ``hop_ns`` from ``mfcc_start_ns``.
        mfcc_start_ns: start of the first MFCC frame's analysis window.
        hop_ns: MFCC hop.
        frame_ns: video frame interval; frames further apart break a window.
        video_frames: frames per window.
        mfcc_steps: MFCC frames per window.

    Returns:
        The windows, in time order.
    """
    pts = np.asarray(frame_pts_ns, dtype=np.int64)
    count = pts.size - video_frames + 1
    if count <= 0 or mfcc.shape[0] < mfcc_steps:
        return _empty(mfcc.shape[1] if mfcc.ndim == 2 else 13, mfcc_steps)
    starts = np.arange(count, dtype=np.int64)
    # consecutive frames only: the last frame of the window is (frames - 1) intervals later
    span = pts[starts + video_frames - 1] - pts[starts]
    steady = np.abs(span - (video_frames - 1) * frame_ns) <= frame_ns // 4
    # the nearest MFCC frame: when the audio does not start on the video's 10 ms grid (an AAC
    # stream starting 96.009 ms in, say), windows are paired to within half a hop, 5 ms
    first = np.round((pts[starts] - mfcc_start_ns) / hop_ns).astype(np.int64)
    inside = (first >= 0) & (first + mfcc_steps <= mfcc.shape[0])
    keep = starts[steady & inside]
    firsts = first[keep]
    index = firsts[:, None] + np.arange(mfcc_steps)[None, :]
    audio = np.asarray(mfcc, dtype=np.float32)[index].transpose(0, 2, 1)
    return PairedWindows(
        starts=keep, pts_ns=pts[keep], audio=np.ascontiguousarray(audio), steps=firsts
    )


def _empty(ceps: int, steps: int) -> PairedWindows:
    return PairedWindows(
        starts=np.zeros(0, dtype=np.int64),
        pts_ns=np.zeros(0, dtype=np.int64),
        audio=np.zeros((0, ceps, steps), dtype=np.float32),
        steps=np.zeros(0, dtype=np.int64),
    )


def video_windows(
    frames: npt.NDArray[np.generic], starts: npt.NDArray[np.int64]
) -> npt.NDArray[np.generic]:
    """Stack ``video_frames`` consecutive frames per window: ``(n, 5, *frame_shape)``."""
    index = starts[:, None] + np.arange(VIDEO_FRAMES)[None, :]
    return np.ascontiguousarray(frames[index])


def longest_run(starts: npt.NDArray[np.int64], pts_ns: npt.NDArray[np.int64]) -> slice:
    """The longest run of windows on consecutive frames (the shift search needs a steady grid).

    Args:
        starts: window start indices ``(n,)`` as :func:`pair_windows` returns them.
        pts_ns: their timestamps ``(n,)``.
    """
    if starts.size == 0:
        return slice(0, 0)
    steps_ok = (np.diff(starts) == 1) & (np.abs(np.diff(pts_ns) - FRAME_NS) <= FRAME_NS // 4)
    breaks = np.flatnonzero(~steps_ok) + 1
    bounds = np.concatenate(([0], breaks, [starts.size]))
    best = int(np.argmax(np.diff(bounds)))
    return slice(int(bounds[best]), int(bounds[best + 1]))


def audio_window_range(
    first_step: int,
    mfcc_frames: int,
    *,
    steps_per_frame: int = MFCC_STEPS // VIDEO_FRAMES,
    mfcc_steps: int = MFCC_STEPS,
) -> tuple[int, int]:
    """Positions of the first and last whole MFCC window on a run's frame grid.

    Position ``p`` is the window whose first step is ``first_step + steps_per_frame * p``
    (position 0 pairs with the run's first video window); it is whole when its ``mfcc_steps``
    steps all lie in ``[0, mfcc_frames)``. The first position is 0 or negative (sound before
    the run), the last may be past the run's end (sound after it).
    """
    return -(first_step // steps_per_frame), (mfcc_frames - mfcc_steps - first_step) // (
        steps_per_frame
    )


def _chunking(windows: int, chunk: int, context: int) -> tuple[int, int]:
    """``(chunks, frames per chunk)`` for ``windows`` windows, ``chunk`` a chunk, with context."""
    return -(-windows // chunk), chunk + VIDEO_FRAMES - 1 + 2 * context


def frame_chunks(
    frames: npt.NDArray[np.generic], first_frame: int, windows: int, *, chunk: int, context: int
) -> npt.NDArray[np.generic]:
    """A run of windows cut into the fixed-size chunks a chunk model's video tower takes.

    Chunk ``c`` holds frames ``first_frame + c * chunk - context`` onwards, ``chunk + 4 + 2 *
    context`` of them: ``(k, chunk + 4 + 2 * context, *frame_shape)``. Frames before the run's
    first or after its last frame repeat the edge frame (a chunk model's context then sees a
    still picture rather than zeros it never saw in training); the towers give ``k * chunk``
    embeddings, of which the first ``windows`` are the run's.

    Args:
        frames: the track's frames ``(T, ...)``.
        first_frame: index of the run's first window's first frame in ``frames``.
        windows: windows in the run (consecutive frames).
        chunk: windows per chunk.
        context: frames of context on each side.
    """
    count, span = _chunking(windows, chunk, context)
    last_frame = first_frame + windows + VIDEO_FRAMES - 2
    offsets = np.arange(count)[:, None] * chunk - context + np.arange(span)[None, :]
    frame_index = np.clip(first_frame + offsets, first_frame, last_frame)
    return np.ascontiguousarray(frames[frame_index])


def mfcc_chunks(
    mfcc: npt.NDArray[np.floating],
    first_step: int,
    windows: int,
    *,
    chunk: int,
    context: int,
    steps_per_frame: int = MFCC_STEPS // VIDEO_FRAMES,
) -> npt.NDArray[np.float32]:
    """The audio side of :func:`frame_chunks`: ``(k, 13, 4 * (chunk + 4 + 2 * context))``.

    Chunk ``c`` holds the MFCC steps from ``first_step + 4 * (c * chunk - context)`` over the
    span of its frames; steps outside ``mfcc`` repeat the edge step (a steady sound).

    Args:
        mfcc: the stream's MFCC ``(N, 13)``.
        first_step: index of the first window's first MFCC step in ``mfcc``.
        windows: windows (consecutive 4-step MFCC offsets).
        chunk: windows per chunk.
        context: frames of context on each side.
        steps_per_frame: MFCC steps per video frame.
    """
    count, span = _chunking(windows, chunk, context)
    step_offsets = (
        np.arange(count)[:, None] * chunk * steps_per_frame
        - context * steps_per_frame
        + np.arange(span * steps_per_frame)[None, :]
    )
    step_index = np.clip(first_step + step_offsets, 0, mfcc.shape[0] - 1)
    audio = np.asarray(mfcc, dtype=np.float32)[step_index].transpose(0, 2, 1)
    return np.ascontiguousarray(audio)
