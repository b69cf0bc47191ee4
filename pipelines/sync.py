"""Offline audio-video sync of files: the offset and the sync scores of every face track.

Per file: :func:`~pipelines.features.extract_clip` decodes it once (crops per track, the MFCC of
the model's preset) -> :func:`~engine.analysis.windows.pair_windows` pairs 5-frame windows with
their 20 MFCC steps on timestamps -> every window of every track goes through two shared
:class:`~engine.runtime.batcher.Batcher` s (one per tower) -> :func:`~engine.analysis.sync.
estimate_sync` per track.

One :class:`SyncRunner` serves any number of files at once (``talkscope sync --jobs N``): their
windows fill the same batches. The batchers queue uint8 crop windows that are views into each
track's crops (no copy per window) and convert a whole batch to the model's layout on their
worker thread (:mod:`engine.models.inputs`), so neither the float conversion nor the models run
on the event loop. Both towers share one worker thread by default: on a CPU, two sessions that
each use every core only fight over them.

A track is estimated over its longest run of consecutive windows, and only when that run has at
least ``min_windows`` windows (default 31, the width of the ±15-frame shift search); shorter
tracks are reported with ``None`` offset and a reason.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt

from engine.analysis.sync import DEFAULT_MAX_SHIFT, SyncEstimate, estimate_sync
from engine.analysis.windows import (
    VIDEO_FRAMES,
    audio_window_range,
    frame_chunks,
    longest_run,
    mfcc_chunks,
    pair_windows,
)
from engine.core.errors import UsageError
from engine.core.stage import first_real_error
from engine.models.inputs import audio_input, crop_kind, crop_window_shape, video_input
from engine.models.spec import ModelSpec, TowerName
from engine.runtime.backends import InferenceBackend
from engine.runtime.batcher import Batcher, BatcherStats
from pipelines.features import ClipFeatures, TrackFeatures, extract_clip

WindowKey = tuple[str, int, int]
"""``(source, track_id, index of the window's first frame in the track)``; for a chunk model
``(source, track_id, chunk number)``."""

Item = tuple[WindowKey, Mapping[str, npt.NDArray[Any]]]

MIN_WINDOWS = 2 * DEFAULT_MAX_SHIFT + 1
"""Fewest consecutive windows a track needs for an estimate: the ±15-frame search's width."""

DEFAULT_MAX_BATCH: dict[str, int] = {"syncnet_v2": 16, "syncnet_lite": 4}
"""Windows per model call, by model. Measured on one CPU thread (``benchmarks/offline_sync.py``):
SyncNet v2 costs about the same per window at any batch from 1 to 32 (about 30 ms video, 3.5 ms
audio), so 16 keeps its batch memory (3 MB a window as float32) small. A SyncNet-lite item is a
chunk of 48 windows (64 frames, 3.2 MB as float32), so 4 chunks make a batch of 192 windows. GPUs
gain from larger batches."""

DEFAULT_MAX_WAIT_MS = 5.0
"""How long a partial batch waits for windows of other files, in ms."""


@dataclass(eq=False)
class TrackEmbeddings:
    """A track's per-window sync embeddings, kept for sync over parts of it (identity).

    Attributes:
        pts_ns: the first frame's timestamp of each window ``(windows,)``, consecutive frames.
        video: lip embeddings ``(windows, dim)``.
        audio: audio embeddings ``(lead + windows + trail, dim)``; row ``lead + i`` pairs with
            ``video[i]``.
        lead: audio rows before the first window's.
    """

    pts_ns: npt.NDArray[np.int64]
    video: npt.NDArray[np.float32]
    audio: npt.NDArray[np.float32]
    lead: int

    def estimate(self, start_ns: int, end_ns: int, max_shift: int) -> SyncEstimate | None:
        """The sync over the windows starting in ``[start_ns, end_ns)``.

        None for fewer than 10 windows (0.4 s).
        """
        rows = np.flatnonzero((self.pts_ns >= start_ns) & (self.pts_ns < end_ns))
        if len(rows) < 10:
            return None
        a, b = int(rows[0]), int(rows[-1]) + 1
        first = max(0, self.lead + a - max_shift)
        last = min(len(self.audio), self.lead + b + max_shift)
        return estimate_sync(
            self.video[a:b],
            self.audio[first:last],
            max_shift=max_shift,
            audio_lead=self.lead + a - first,
        )


@dataclass
class TrackSync:
    """The sync of one face track, or why there is none.

    Attributes:
        track_id: the track (unique within the file).
        offset_frames: the best shift in video frames, positive = audio leads; None without an
            estimate.
        offset_ms: ``offset_frames`` in milliseconds (40 ms a frame); None without an estimate.
        confidence: LSE-C, ``median - min`` of the mean distances over shifts; None without.
        min_dist: LSE-D, the mean distance at the best shift; None without.
        frames: the windows (5-frame window / 20 MFCC step pairs) the estimate is over; without
            an estimate, the windows the track had.
        box: the track's median box ``[x0, y0, x1, y1]``, source pixels.
        reason: why there is no estimate; None when there is one.
    """

    track_id: int
    offset_frames: int | None
    offset_ms: float | None
    confidence: float | None
    min_dist: float | None
    frames: int
    box: list[float]
    reason: str | None = None
    embeddings: TrackEmbeddings | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON object of ``talkscope sync --json``; ``reason`` only when there is one."""
        data: dict[str, Any] = {
            "track_id": self.track_id,
            "offset_frames": self.offset_frames,
            "offset_ms": self.offset_ms,
            "confidence": self.confidence,
            "min_dist": self.min_dist,
            "frames": self.frames,
            "box": self.box,
        }
        if self.reason is not None:
            data["reason"] = self.reason
        return data


@dataclass
class FileSyncReport:
    """The sync of every face track of one file.

    Attributes:
        source: the path or URL.
        tracks: one entry per face track, by track id.
        seconds: wall time from the start of decoding to the last estimate, in seconds.
        video_frames: pictures decoded on the 25 fps grid.
        windows: windows embedded (both towers), all tracks together.
    """

    source: str
    tracks: list[TrackSync]
    seconds: float
    video_frames: int
    windows: int

    def to_json(self) -> dict[str, Any]:
        """``{"file", "tracks", "seconds"}``, the line ``talkscope sync --json`` prints."""
        return {
            "file": self.source,
            "tracks": [track.to_json() for track in self.tracks],
            "seconds": round(self.seconds, 3),
        }


@dataclass
class SyncProgress:
    """Counters for a progress display; ``listener`` is called on the loop after each change.

    Attributes:
        files_total: files to do.
        files_done: files finished, failed ones included.
        windows_total: windows found so far (known once a file is decoded).
        windows_done: windows whose video embedding is done.
        listener: called with this object after every update; must not block.
    """

    files_total: int = 0
    files_done: int = 0
    windows_total: int = 0
    windows_done: int = 0
    listener: Callable[[SyncProgress], None] | None = field(default=None, repr=False)

    def update(self, *, files_done: int = 0, windows_total: int = 0, windows_done: int = 0) -> None:
        """Add to the counters and tell the listener."""
        self.files_done += files_done
        self.windows_total += windows_total
        self.windows_done += windows_done
        if self.listener is not None:
            self.listener(self)


@dataclass
class _TrackPlan:
    track: TrackFeatures
    crops: npt.NDArray[np.uint8] | None
    starts: npt.NDArray[np.int64]
    audio: npt.NDArray[np.float32]
    steps: npt.NDArray[np.int64]
    available: int
    reason: str | None


class SyncRunner:
    """Runs the sync of files through one model, with one shared batcher per tower.

    An async context manager; :meth:`analyse_file` may run concurrently for many files (their
    windows share batches). Belongs to the event loop that entered it.

    Args:
        spec: the model.
        backends: ``{"video": backend, "audio": backend}``, e.g. from
            :func:`engine.models.loading.tower_backends`.
        max_batch: windows per model call; None picks :data:`DEFAULT_MAX_BATCH` for the model.
        max_wait_ms: how long a partial batch waits for more windows, in ms.
        max_queue: windows waiting per tower; None means ``4 * max_batch``.
        min_windows: fewest consecutive windows a track needs for an estimate; at least 1.
        max_shift: shifts searched on each side, in frames.
        progress: counters to update (windows found and done); None for none.
        executor: where both towers' batches run; None gives the runner one worker thread,
            shared by the two towers, shut down on close.
        keep_embeddings: attach each track's window embeddings to its result
            (:class:`TrackEmbeddings`), for sync over parts of the track.

    Raises:
        UsageError: ``backends`` lacks a tower, or a size is out of range.
    """

    def __init__(
        self,
        spec: ModelSpec,
        backends: Mapping[TowerName, InferenceBackend],
        *,
        max_batch: int | None = None,
        max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
        max_queue: int | None = None,
        min_windows: int = MIN_WINDOWS,
        max_shift: int = DEFAULT_MAX_SHIFT,
        progress: SyncProgress | None = None,
        executor: concurrent.futures.Executor | None = None,
        keep_embeddings: bool = False,
    ) -> None:
        missing = [tower.tower for tower in spec.towers if tower.tower not in backends]
        if missing:
            raise UsageError(f"no back-end for the {', '.join(missing)} tower of {spec.name}")
        batch = DEFAULT_MAX_BATCH.get(spec.name, 32) if max_batch is None else max_batch
        if batch < 1 or min_windows < 1 or max_shift < 0:
            raise UsageError("max_batch and min_windows must be at least 1, max_shift at least 0")
        self.spec = spec
        self.backends = dict(backends)
        self.max_batch = batch
        self.max_wait_ms = max_wait_ms
        self.max_queue = max(batch, 4 * batch if max_queue is None else max_queue)
        self.min_windows = min_windows
        self.max_shift = max_shift
        self.progress = progress if progress is not None else SyncProgress()
        self.keep_embeddings = keep_embeddings
        self._crop = crop_kind(spec)
        self._executor = executor
        self._owns_executor = executor is None
        self._stack: AsyncExitStack | None = None
        self._video: Batcher[WindowKey] | None = None
        self._audio: Batcher[WindowKey] | None = None

    @property
    def providers(self) -> tuple[str, ...]:
        """Where the video tower really runs, e.g. ``("cpu",)``."""
        return self.backends["video"].providers

    async def __aenter__(self) -> SyncRunner:
        """Start the two batchers.

        Raises:
            RuntimeError: the runner is entered already.
        """
        if self._stack is not None:
            raise RuntimeError("the SyncRunner is entered already")
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"{self.spec.name}-model"
            )
        stack = AsyncExitStack()
        self._stack = stack
        try:
            self._video = await stack.enter_async_context(
                Batcher[WindowKey](
                    self._run_video,
                    max_batch=self.max_batch,
                    max_wait_ms=self.max_wait_ms,
                    max_queue=self.max_queue,
                    name=f"{self.spec.name}-video",
                    executor=self._executor,
                    input_spec={"crops": (crop_window_shape(self.spec), np.uint8)},
                )
            )
            self._audio = await stack.enter_async_context(
                Batcher[WindowKey](
                    self._run_audio,
                    max_batch=self.max_batch,
                    max_wait_ms=self.max_wait_ms,
                    max_queue=self.max_queue,
                    name=f"{self.spec.name}-audio",
                    executor=self._executor,
                    input_spec={"mfcc": (self.spec.audio.input.shape[1:], np.float32)},
                )
            )
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the batchers (see :meth:`aclose`)."""
        await self.aclose()

    async def aclose(self) -> None:
        """Close both batchers (queued windows fail) and the worker thread. Idempotent."""
        stack, self._stack = self._stack, None
        try:
            if stack is not None:
                await stack.aclose()
        finally:
            if self._owns_executor and self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)
                self._executor = None

    @property
    def stats(self) -> dict[TowerName, BatcherStats]:
        """The two batchers' :class:`~engine.runtime.batcher.BatcherStats`, by tower."""
        return {name: batcher.stats for name, batcher in self._batchers() if batcher is not None}

    def _batchers(self) -> list[tuple[TowerName, Batcher[WindowKey] | None]]:
        return [("video", self._video), ("audio", self._audio)]

    # --- the model calls, on the worker thread ---------------------------------------------

    def _run_video(self, inputs: Mapping[str, npt.NDArray[Any]]) -> npt.NDArray[np.float32]:
        tower = self.spec.video
        return self.backends["video"].run(
            {tower.input.name: video_input(self.spec, inputs["crops"])}
        )

    def _run_audio(self, inputs: Mapping[str, npt.NDArray[Any]]) -> npt.NDArray[np.float32]:
        tower = self.spec.audio
        return self.backends["audio"].run(
            {tower.input.name: audio_input(self.spec, inputs["mfcc"])}
        )

    # --- files -------------------------------------------------------------------------------

    async def analyse_file(self, uri: str, *, max_seconds: float | None = None) -> FileSyncReport:
        """Decode one file and estimate the sync of each of its face tracks.

        Args:
            uri: path or URL.
            max_seconds: stop decoding after this much video.

        Returns:
            The report, tracks by id.

        Raises:
            EngineError: the file cannot be opened or decoded, lacks audio or video
                (:class:`~engine.core.errors.InputError`), or a model call failed
                (:class:`~engine.core.errors.StageError`).
            RuntimeError: the runner was not entered.
        """
        if self._video is None or self._audio is None:
            raise RuntimeError("enter the SyncRunner (async with) before analysing files")
        start = time.perf_counter()
        features = await extract_clip(
            uri,
            preset=self.spec.window.mfcc_preset,
            want_face=self._crop == "face",
            max_seconds=max_seconds,
        )
        return await self.analyse_features(features, started=start)

    async def analyse_features(
        self, features: ClipFeatures, *, started: float | None = None
    ) -> FileSyncReport:
        """The sync of each track of an already decoded clip.

        Its MFCC preset must be the model's, and SyncNet v2 needs the 224×224 face crops;
        ``started`` is when the work on it began, for the report's ``seconds``.

        Raises:
            StageError: a model call failed.
            RuntimeError: the runner was not entered.
        """
        if self._video is None or self._audio is None:
            raise RuntimeError("enter the SyncRunner (async with) before analysing files")
        start = time.perf_counter() if started is None else started
        uri = features.source
        plans = [self._plan(track, features) for track in features.tracks]
        runnable = [plan for plan in plans if plan.reason is None]
        windows = sum(len(plan.starts) for plan in runnable)
        self.progress.update(windows_total=windows)
        async with task_group() as group:
            tasks = {
                plan.track.track_id: group.create_task(self._estimate(uri, plan, features.mfcc))
                for plan in runnable
            }
        tracks = [
            tasks[plan.track.track_id].result() if plan.reason is None else _no_estimate(plan)
            for plan in plans
        ]
        return FileSyncReport(
            source=uri,
            tracks=tracks,
            seconds=time.perf_counter() - start,
            video_frames=features.video_frames,
            windows=windows,
        )

    def _plan(self, track: TrackFeatures, features: ClipFeatures) -> _TrackPlan:
        crops = track.face if self._crop == "face" else track.face112
        paired = pair_windows(track.pts_ns, features.mfcc, features.mfcc_start_ns)
        run = longest_run(paired.starts, paired.pts_ns)
        starts, audio, steps = paired.starts[run], paired.audio[run], paired.steps[run]
        reason = None
        if crops is None:
            reason = f"no {self._crop} crops were kept"
        elif len(starts) == 0:
            reason = (
                f"no window of {VIDEO_FRAMES} consecutive frames with audio "
                f"({len(track.pts_ns)} frames)"
            )
        elif len(starts) < self.min_windows:
            reason = (
                f"only {len(starts)} consecutive windows with audio; {self.min_windows} needed "
                f"for the ±{self.max_shift}-frame search"
            )
        return _TrackPlan(track, crops, starts, audio, steps, len(starts), reason)

    def _items(
        self, uri: str, plan: _TrackPlan, mfcc: npt.NDArray[np.float32]
    ) -> tuple[list[Item], list[Item], list[int], slice[int, int, None]]:
        """Batcher items of both towers, windows per video item, and where the audio rows are.

        The slice locates the audio rows in the audio tower's output (``start`` is the lead).

        A chunk model also gets the sound around the run (up to ``max_shift`` windows a side,
        where the MFCC has it), so the shift search compares with real audio rather than zeros;
        the lead is how many audio windows come before the run's first.
        """
        assert plan.crops is not None
        crops, track_id, window = plan.crops, plan.track.track_id, self.spec.window
        if not window.is_chunked:
            keys = [(uri, track_id, int(s)) for s in plan.starts]
            video: list[Item] = [
                (key, {"crops": crops[s : s + VIDEO_FRAMES]})
                for key, s in zip(keys, plan.starts.tolist(), strict=True)
            ]
            audio: list[Item] = [(key, {"mfcc": plan.audio[i]}) for i, key in enumerate(keys)]
            return video, audio, [1] * len(video), slice(0, len(audio))
        count, size, first_step = len(plan.starts), window.chunk_windows, int(plan.steps[0])
        steps_per_frame = window.mfcc_steps // window.video_frames
        first, last = audio_window_range(
            first_step,
            mfcc.shape[0],
            steps_per_frame=steps_per_frame,
            mfcc_steps=window.mfcc_steps,
        )
        lead = min(self.max_shift, -first)
        trail = max(0, min(self.max_shift, last - (count - 1)))
        faces = frame_chunks(
            crops, int(plan.starts[0]), count, chunk=size, context=window.context_frames
        )
        sound = mfcc_chunks(
            mfcc,
            first_step - steps_per_frame * lead,
            lead + count + trail,
            chunk=size,
            context=window.context_frames,
            steps_per_frame=steps_per_frame,
        )
        video = [((uri, track_id, c), {"crops": faces[c]}) for c in range(faces.shape[0])]
        audio = [((uri, track_id, c), {"mfcc": sound[c]}) for c in range(sound.shape[0])]
        covered = [min(size, count - c * size) for c in range(len(video))]
        return video, audio, covered, slice(lead, lead + count + trail)

    async def _estimate(
        self, uri: str, plan: _TrackPlan, mfcc: npt.NDArray[np.float32]
    ) -> TrackSync:
        assert self._video is not None and self._audio is not None and plan.crops is not None
        track_id, count = plan.track.track_id, len(plan.starts)
        video_items, audio_items, covered, rows = self._items(uri, plan, mfcc)
        async with task_group() as group:
            video = group.create_task(self._embed(self._video, video_items, covered))
            audio = group.create_task(self._embed(self._audio, audio_items, None))
        dim = self.spec.embedding_size
        video_emb = video.result().reshape(-1, dim)[:count]
        audio_emb = audio.result().reshape(-1, dim)[: rows.stop]
        if not (np.isfinite(video_emb).all() and np.isfinite(audio_emb).all()):
            plan.reason = "the model gave NaN or infinite embeddings (broken weights?)"
            return _no_estimate(plan)
        estimate = await asyncio.to_thread(
            estimate_sync,
            video_emb,
            audio_emb,
            max_shift=self.max_shift,
            fps=float(self.spec.window.fps),
            audio_lead=rows.start,
        )
        return TrackSync(
            track_id=track_id,
            offset_frames=estimate.offset_frames,
            offset_ms=estimate.offset_ms,
            confidence=estimate.confidence,
            min_dist=estimate.min_dist,
            frames=estimate.frames,
            box=plan.track.box,
            embeddings=self._kept(plan, video_emb, audio_emb, rows.start),
        )

    def _kept(
        self,
        plan: _TrackPlan,
        video: npt.NDArray[np.float32],
        audio: npt.NDArray[np.float32],
        lead: int,
    ) -> TrackEmbeddings | None:
        if not self.keep_embeddings:
            return None
        pts = plan.track.pts_ns[plan.starts].astype(np.int64)
        return TrackEmbeddings(pts, video, audio, lead)

    async def _embed(
        self,
        batcher: Batcher[WindowKey],
        items: Sequence[tuple[WindowKey, Mapping[str, npt.NDArray[Any]]]],
        covered: Sequence[int] | None,
    ) -> npt.NDArray[np.float32]:
        """Outputs ``(len(items), *output)``, submitted a batch at a time for the progress.

        ``covered[i]`` windows are counted done when item ``i`` is (None: not counted).
        """
        size = batcher.max_batch
        starts = range(0, len(items), size)

        async def chunk_rows(start: int) -> list[npt.NDArray[Any]]:
            rows = await batcher.submit_many(items[start : start + size])
            if covered is not None:
                self.progress.update(windows_done=sum(covered[start : start + size]))
            return rows

        async with task_group() as group:
            tasks = [group.create_task(chunk_rows(start)) for start in starts]
        rows = [row for task in tasks for row in task.result()]
        return np.stack(rows).astype(np.float32, copy=False)


@asynccontextmanager
async def task_group() -> AsyncIterator[asyncio.TaskGroup]:
    """An :class:`asyncio.TaskGroup` that raises its first real error as it is.

    A plain TaskGroup wraps a failure in an ``ExceptionGroup``, which callers catching
    :class:`~engine.core.errors.EngineError` (the CLI, per file) would miss.
    """
    try:
        async with asyncio.TaskGroup() as group:
            yield group
    except BaseExceptionGroup as errors:
        raise first_real_error(errors)  # noqa: B904  (keep its own __cause__: the real failure)


def _no_estimate(plan: _TrackPlan) -> TrackSync:
    return TrackSync(
        track_id=plan.track.track_id,
        offset_frames=None,
        offset_ms=None,
        confidence=None,
        min_dist=None,
        frames=plan.available,
        box=plan.track.box,
        reason=plan.reason,
    )
