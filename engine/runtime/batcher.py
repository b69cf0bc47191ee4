"""The cross-stream batcher: one per model tower and device, shared by every stream and track.

Callers on the event loop :meth:`Batcher.submit` one item each (one face crop, one MFCC window)
under an opaque, hashable key such as ``(stream_id, track_id, pts_ns)``. The batcher stacks the
queued items along a new axis 0, runs the model's synchronous ``run_batch`` on a worker thread,
and hands each caller its own output row. It knows nothing of faces or streams.

When a batch runs::

    enqueue ──► [queue: at most max_queue items] ──► batch of <= max_batch ──► run_batch (thread)
                 flush when max_batch items wait,
                 or when the oldest waited max_wait_ms

One batch runs at a time per batcher, so the model is never oversubscribed by its own batcher;
items that arrive meanwhile queue up, and the next batch is fuller: under load batches fill by
themselves, and when idle an item waits at most ``max_wait_ms``.

Back-pressure: ``max_queue`` is required and bounded. :meth:`Batcher.submit` waits for room (in
arrival order); :meth:`Batcher.try_submit` raises :class:`~engine.core.errors.Overloaded` at
once, so that live code can drop a frame instead of adding latency.

Failures stay local: an item whose inputs do not match the batcher's input signature is refused
at its own ``submit`` (``ValueError``); an exception in ``run_batch`` fails only the items of that
batch (:class:`~engine.core.errors.StageError`, cause chained); a cancelled ``submit`` leaves the
queue, or has its result discarded when its batch already runs.

Loop and thread affinity: a batcher belongs to the event loop that entered it; call its methods
from that loop only. ``run_batch`` is called on the batcher's own single worker thread (or on the
given executor), one call at a time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import math
from collections import deque
from collections.abc import Callable, Coroutine, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import Any, Generic, TypeVar

import numpy as np
import numpy.typing as npt

from engine.core.clock import Clock, SystemClock
from engine.core.errors import ChannelClosed, Overloaded, StageError

Key = TypeVar("Key", bound=Hashable)

RunBatch = Callable[[Mapping[str, npt.NDArray[Any]]], npt.NDArray[Any]]
"""A back-end's synchronous ``run``: ``{name: (batch, *shape)}`` in, ``(batch, dim)`` out."""

InputSpec = Mapping[str, tuple[tuple[int, ...], npt.DTypeLike]]
"""``{input name: (shape of one item without the batch axis, dtype)}``."""

_NS_PER_MS = 1_000_000


class _State(enum.Enum):
    NEW = "new"
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"


@dataclass(eq=False)
class _Item(Generic[Key]):
    """One submitted item. Compared by identity (it holds arrays)."""

    key: Key
    inputs: Mapping[str, npt.NDArray[Any]]
    future: asyncio.Future[npt.NDArray[Any]]
    enqueued_ns: int = 0
    state: _State = _State.NEW


@dataclass(frozen=True)
class BatcherStats:
    """A snapshot of a batcher's counters and recent timings.

    Percentiles are over the most recent ``stats_window`` samples and are None before the first
    sample. Fill is items per batch over ``max_batch`` (1.0 = full batches).

    Attributes:
        name: the batcher's name.
        max_batch: the most items per batch.
        max_queue: the most items waiting.
        queue_depth: items waiting now (not yet in a batch).
        high_water: the most items ever waiting at once.
        submitted: items accepted into the queue.
        completed: items whose output row was delivered.
        failed: items failed by an error in ``run_batch``.
        cancelled: items withdrawn by their caller (queued or running).
        rejected: ``try_submit`` calls refused with ``Overloaded``.
        invalid: submits refused because their inputs did not match the signature.
        closed: items failed because the batcher closed before they got a result.
        batches: ``run_batch`` calls made.
        batch_errors: ``run_batch`` calls that raised or returned a bad shape.
        items: items in all batches run (``batches`` times mean fill times ``max_batch``).
        mean_fill: mean batch fill since the start; 0.0 before the first batch.
        last_fill: fill of the last batch; 0.0 before the first batch.
        wait_ms_p50: median time from enqueue to the start of the item's batch, in ms.
        wait_ms_p95: 95th percentile of the same, in ms.
        compute_ms_p50: median duration of ``run_batch``, in ms.
        compute_ms_p95: 95th percentile of the same, in ms.
    """

    name: str
    max_batch: int
    max_queue: int
    queue_depth: int
    high_water: int
    submitted: int
    completed: int
    failed: int
    cancelled: int
    rejected: int
    invalid: int
    closed: int
    batches: int
    batch_errors: int
    items: int
    mean_fill: float
    last_fill: float
    wait_ms_p50: float | None
    wait_ms_p95: float | None
    compute_ms_p50: float | None
    compute_ms_p95: float | None


@dataclass
class _Counters:
    high_water: int = 0
    submitted: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    rejected: int = 0
    invalid: int = 0
    closed: int = 0
    batches: int = 0
    batch_errors: int = 0
    items: int = 0
    last_fill: float = 0.0
    wait_ns: deque[int] = field(default_factory=deque)
    compute_ns: deque[int] = field(default_factory=deque)


class Batcher(Generic[Key]):
    """Batches items from many concurrent callers into calls of one synchronous model.

    Use it as an async context manager::

        async with Batcher(backend.run, max_batch=32, max_wait_ms=10, max_queue=256,
                           name="syncnet-lip") as lip:
            embedding = await lip.submit((stream_id, track_id, pts_ns), {"video": crop})

    The input signature (names, per-item shapes and dtypes) is ``input_spec`` when given, else
    that of the first accepted item; every later item must match it exactly.

    Args:
        run_batch: the model call, run off the event loop: takes ``{name: (batch, *shape)}``
            arrays stacked along axis 0 and returns ``(batch, ...)`` outputs, row ``i`` for
            item ``i``. One call at a time per batcher.
        max_batch: the most items per call; at least 1.
        max_wait_ms: the longest the oldest queued item waits for a batch to fill, in ms; 0
            runs whatever is queued at once.
        max_queue: the most items waiting (not counting the running batch); at least
            ``max_batch``. Required: there is no unbounded mode.
        name: names the worker task and thread, and appears in errors and stats.
        executor: where ``run_batch`` runs; None (the default) gives the batcher its own
            single thread, shut down by :meth:`aclose`. A given executor is not shut down.
        input_spec: ``{name: (shape, dtype)}`` of one item, batch axis excluded; fixes the
            signature up front instead of taking it from the first item.
        clock: source of time for ``max_wait_ms`` and the timings in :attr:`stats`; read from
            the worker thread too. Defaults to the system monotonic clock.
        stats_window: how many recent samples the percentiles in :attr:`stats` are over.

    Raises:
        ValueError: a size is out of range, or ``input_spec`` names no input.
    """

    def __init__(
        self,
        run_batch: RunBatch,
        *,
        max_batch: int,
        max_wait_ms: float,
        max_queue: int,
        name: str = "batcher",
        executor: concurrent.futures.Executor | None = None,
        input_spec: InputSpec | None = None,
        clock: Clock | None = None,
        stats_window: int = 1024,
    ) -> None:
        """See the class docstring."""
        if max_batch < 1:
            raise ValueError(f"{name}: max_batch must be at least 1, got {max_batch}")
        if max_queue < max_batch:
            raise ValueError(
                f"{name}: max_queue ({max_queue}) must be at least max_batch ({max_batch})"
            )
        if not 0 <= max_wait_ms < math.inf:
            raise ValueError(f"{name}: max_wait_ms must be finite and >= 0, got {max_wait_ms}")
        if stats_window < 1:
            raise ValueError(f"{name}: stats_window must be at least 1, got {stats_window}")
        self.name = name
        self.max_batch = max_batch
        self.max_wait_ms = float(max_wait_ms)
        self.max_queue = max_queue
        self._run_batch = run_batch
        self._max_wait_ns = round(max_wait_ms * _NS_PER_MS)
        self._executor = executor
        self._owns_executor = executor is None
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._signature: dict[str, tuple[tuple[int, ...], np.dtype[Any]]] | None = None
        if input_spec is not None:
            self._signature = {
                str(k): (tuple(int(n) for n in shape), np.dtype(dtype))
                for k, (shape, dtype) in input_spec.items()
            }
            if not self._signature:
                raise ValueError(f"{name}: input_spec names no input")
        self._queue: deque[_Item[Key]] = deque()
        self._running: list[_Item[Key]] = []
        self._room_waiters: deque[asyncio.Future[None]] = deque()
        self._reserved = 0  # room granted to waiters that have not enqueued yet
        self._wakeup = asyncio.Event()
        self._serve_task: asyncio.Task[None] | None = None
        self._closing = False  # intake stopped (aclose, or the worker stopped on its own)
        self._aclose_called = False
        self._closed = asyncio.Event()
        self._counters = _Counters(
            wait_ns=deque(maxlen=stats_window), compute_ns=deque(maxlen=stats_window)
        )

    # --- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Batcher[Key]:
        """Start the worker (and its thread, unless an executor was given).

        Raises:
            RuntimeError: the batcher was already started.
        """
        if self._serve_task is not None or self._aclose_called:
            raise RuntimeError(f"{self.name}: a batcher is entered once")
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=self.name
            )
        self._serve_task = asyncio.create_task(self._serve(), name=f"{self.name}:batches")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close without draining: queued items fail with ChannelClosed (see :meth:`aclose`)."""
        await self.aclose(drain=False)

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` has begun: no new item is accepted."""
        return self._closing

    async def aclose(self, *, drain: bool = True, timeout_s: float = 5.0) -> None:
        """Stop the batcher. Idempotent; a second call waits for the first to finish.

        Intake stops at once: later submits, and submits still waiting for room, raise
        :class:`ChannelClosed`.

        Args:
            drain: True runs the queued items (without waiting for fuller batches) and
                delivers their results; False fails them at once with :class:`ChannelClosed`.
            timeout_s: deadline for the queued items (drain) and the running batch. Past it the
                worker is cancelled, whatever has no result yet fails with
                :class:`ChannelClosed`, and a ``run_batch`` call still running is left to finish
                on its thread, its result discarded.

        Raises:
            StageError: the batch worker itself had failed (a bug; the cause is chained). The
                items it left were failed with :class:`ChannelClosed` when it stopped.
        """
        if self._aclose_called:
            await self._closed.wait()
            return
        self._aclose_called = True
        self._closing = True
        task = self._serve_task
        try:
            self._wake_all_room_waiters()
            if not drain:
                self._fail_queued("closed before the item ran")
            self._wakeup.set()
            if task is not None:
                done, _ = await asyncio.wait({task}, timeout=timeout_s)
                if not done:
                    task.cancel()
                    await asyncio.wait({task})  # unlike `await task`, keeps our own cancel
            self._fail_queued("closed before the item ran")
            self._fail_running("closed while its batch ran; the result is discarded")
        finally:
            if task is not None and not task.done():  # aclose itself was cancelled
                task.cancel()
            if self._owns_executor and self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)
            self._closed.set()
        if task is not None and not task.cancelled() and task.exception() is not None:
            error = task.exception()
            raise StageError(f"{self.name}: the batch worker failed: {error!r}") from error

    # --- submitting --------------------------------------------------------------------------

    async def submit(self, key: Key, inputs: Mapping[str, npt.NDArray[Any]]) -> npt.NDArray[Any]:
        """Run one item in the next batch with room and return its output row.

        Waits for room when ``max_queue`` items are waiting (back-pressure). Do not modify the
        input arrays until this returns.

        Args:
            key: opaque, hashable label of the item, e.g. ``(stream_id, track_id, pts_ns)``;
                it names the item in errors. Results go back to each caller's own await, so
                equal keys from two callers are still routed right.
            inputs: ``{name: array}`` for one item, without the batch axis.

        Returns:
            The item's row of ``run_batch``'s output (a copy: ``(dim,)`` for a ``(batch, dim)``
            model).

        Raises:
            ValueError: the inputs do not match the batcher's input signature.
            StageError: ``run_batch`` failed on this item's batch (the cause is chained).
            ChannelClosed: the batcher is closed or closed before the item got a result.
            RuntimeError: the batcher was not entered.
        """
        item = self._prepare(key, inputs)
        await self._enqueue(item, wait=True)
        return await self._result(item)

    async def try_submit(
        self, key: Key, inputs: Mapping[str, npt.NDArray[Any]]
    ) -> npt.NDArray[Any]:
        """Like :meth:`submit`, but refuse at once instead of waiting for room.

        Raises:
            Overloaded: ``max_queue`` items are waiting (or other callers wait for room);
                nothing was queued. Retryable.
            ValueError: as :meth:`submit`.
            StageError: as :meth:`submit`.
            ChannelClosed: as :meth:`submit`.
            RuntimeError: as :meth:`submit`.
        """
        item = self._prepare(key, inputs)
        await self._enqueue(item, wait=False)
        return await self._result(item)

    async def submit_many(
        self, items: Iterable[tuple[Key, Mapping[str, npt.NDArray[Any]]]]
    ) -> list[npt.NDArray[Any]]:
        """Submit several items at once (they may share batches) and return their rows in order.

        Every item is checked before any is queued. All or nothing: on the first failure (or
        cancellation) the items without a result are withdrawn and the error is raised.

        Args:
            items: ``(key, inputs)`` pairs, as for :meth:`submit`.

        Returns:
            One output row per item, in the order of ``items``.

        Raises:
            ValueError: an item does not match the input signature (nothing was queued).
            StageError: as :meth:`submit`.
            ChannelClosed: as :meth:`submit`.
            RuntimeError: as :meth:`submit`.
        """
        prepared = [self._prepare(key, inputs) for key, inputs in items]
        try:
            for item in prepared:
                await self._enqueue(item, wait=True)
            return [await self._result(item) for item in prepared]
        except BaseException:
            for item in prepared:
                self._withdraw(item)
            raise

    def _prepare(self, key: Key, inputs: Mapping[str, npt.NDArray[Any]]) -> _Item[Key]:
        if self._serve_task is None and not self._closing:
            raise RuntimeError(f"{self.name}: enter the batcher (async with) before submitting")
        if self._closing:
            raise ChannelClosed(f"{self.name}: submit on a closed batcher")
        arrays = {name: np.asarray(value) for name, value in inputs.items()}
        signature = {name: (array.shape, array.dtype) for name, array in arrays.items()}
        if self._signature is None:
            if not signature:
                self._counters.invalid += 1
                raise ValueError(f"{self.name}: item {key!r} has no inputs")
            self._signature = signature
        elif signature != self._signature:
            self._counters.invalid += 1
            raise ValueError(
                f"{self.name}: item {key!r} does not match the batch inputs: "
                f"{_describe(signature)} given, {_describe(self._signature)} expected"
            )
        future: asyncio.Future[npt.NDArray[Any]] = asyncio.get_running_loop().create_future()
        return _Item(key=key, inputs=MappingProxyType(arrays), future=future)

    def _has_room(self) -> bool:
        return len(self._queue) + self._reserved < self.max_queue

    async def _enqueue(self, item: _Item[Key], *, wait: bool) -> None:
        if self._closing:
            raise ChannelClosed(f"{self.name}: submit on a closed batcher")
        if self._room_waiters or not self._has_room():
            if not wait:
                self._counters.rejected += 1
                raise Overloaded(
                    f"{self.name}: {len(self._queue)} items queued (max_queue {self.max_queue});"
                    f" item {item.key!r} refused"
                )
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._room_waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter in self._room_waiters:
                    self._room_waiters.remove(waiter)
                elif waiter.done() and not waiter.cancelled():
                    # Room was granted to this waiter: pass it on to the next one.
                    self._reserved -= 1
                    self._grant_room()
                raise
            self._reserved -= 1
            if self._closing:
                raise ChannelClosed(f"{self.name}: closed while the item waited for room")
        item.enqueued_ns = self._clock.now_ns()
        item.state = _State.QUEUED
        self._queue.append(item)
        self._counters.submitted += 1
        self._counters.high_water = max(self._counters.high_water, len(self._queue))
        if len(self._queue) == 1 or len(self._queue) >= self.max_batch:
            self._wakeup.set()

    def _grant_room(self) -> None:
        """Wake as many room waiters, oldest first, as there is room for."""
        while self._room_waiters and self._has_room():
            waiter = self._room_waiters.popleft()
            if not waiter.done():
                self._reserved += 1
                waiter.set_result(None)

    def _wake_all_room_waiters(self) -> None:
        while self._room_waiters:
            waiter = self._room_waiters.popleft()
            if not waiter.done():
                self._reserved += 1  # given back by the waiter, which then sees the close
                waiter.set_result(None)

    async def _result(self, item: _Item[Key]) -> npt.NDArray[Any]:
        try:
            return await item.future
        except asyncio.CancelledError:
            self._withdraw(item)
            raise

    def _withdraw(self, item: _Item[Key]) -> None:
        """Take an item out of the queue, or mark its result as unwanted if it runs already."""
        if item.state is _State.DONE:
            if not item.future.cancelled():
                item.future.exception()  # a failure nobody will read: mark it retrieved
            return
        if item.state is _State.QUEUED:
            self._queue.remove(item)
            self._grant_room()
        if item.state is not _State.NEW and (not item.future.done() or item.future.cancelled()):
            self._counters.cancelled += 1
        item.state = _State.DONE
        item.future.cancel()

    # --- the worker --------------------------------------------------------------------------

    async def _serve(self) -> None:
        try:
            while True:
                batch = await self._next_batch()
                if not batch:
                    return
                await self._run(batch)
        finally:
            if not self._closing:  # the worker itself failed: nobody may wait forever
                self._closing = True
                self._wake_all_room_waiters()
            self._fail_queued("the batcher stopped before the item ran")
            self._fail_running("the batcher stopped while its batch ran")

    async def _next_batch(self) -> list[_Item[Key]]:
        """Wait until a batch is due and take it off the queue; [] when closed and drained."""
        while True:
            if not self._queue:
                if self._closing:
                    return []
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if len(self._queue) >= self.max_batch or self._closing:
                break
            deadline_ns = self._queue[0].enqueued_ns + self._max_wait_ns
            if self._clock.now_ns() >= deadline_ns:
                break
            self._wakeup.clear()
            await self._wait_wakeup_or(self._clock.sleep_until(deadline_ns))
        count = min(self.max_batch, len(self._queue))
        batch = [self._queue.popleft() for _ in range(count)]
        start_ns = self._clock.now_ns()
        for item in batch:
            item.state = _State.RUNNING
            self._counters.wait_ns.append(start_ns - item.enqueued_ns)
        self._grant_room()
        return batch

    async def _wait_wakeup_or(self, sleep: Coroutine[Any, Any, None]) -> None:
        sleeper = asyncio.create_task(sleep, name=f"{self.name}:max-wait")
        waker = asyncio.create_task(self._wakeup.wait(), name=f"{self.name}:wakeup")
        try:
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            waker.cancel()
            await asyncio.wait({sleeper, waker})
        if not sleeper.cancelled():
            sleeper.result()  # a clock that raised: let the worker fail loudly

    async def _run(self, batch: list[_Item[Key]]) -> None:
        self._running = batch
        inputs = [item.inputs for item in batch]
        size = len(batch)
        self._counters.batches += 1
        self._counters.items += size
        self._counters.last_fill = size / self.max_batch
        loop = asyncio.get_running_loop()
        try:
            outputs, compute_ns = await loop.run_in_executor(self._executor, self._compute, inputs)
        except Exception as error:
            self._counters.batch_errors += 1
            for item in batch:
                if item.state is _State.RUNNING and not item.future.done():
                    self._counters.failed += 1
                    failure = StageError(
                        f"{self.name}: run_batch failed on a batch of {size} "
                        f"(item {item.key!r}): {type(error).__name__}: {error}"
                    )
                    failure.__cause__ = error
                    item.future.set_exception(failure)
                item.state = _State.DONE
        else:
            self._counters.compute_ns.append(compute_ns)
            for index, item in enumerate(batch):
                if item.state is _State.RUNNING and not item.future.done():
                    self._counters.completed += 1
                    item.future.set_result(np.array(outputs[index]))
                item.state = _State.DONE
        finally:
            # Cancelled (aclose past its deadline): leave the batch for _fail_running.
            if all(item.state is _State.DONE for item in batch):
                self._running = []

    def _compute(
        self, inputs: list[Mapping[str, npt.NDArray[Any]]]
    ) -> tuple[npt.NDArray[Any], int]:
        """Stack, run and check one batch. Runs on the worker thread."""
        size = len(inputs)
        stacked = {name: np.stack([item[name] for item in inputs]) for name in inputs[0]}
        start_ns = self._clock.now_ns()
        outputs = np.asarray(self._run_batch(stacked))
        compute_ns = self._clock.now_ns() - start_ns
        if outputs.ndim < 1 or outputs.shape[0] != size:
            raise ValueError(f"returned shape {outputs.shape} for a batch of {size}")
        return outputs, compute_ns

    # --- failing what is left ----------------------------------------------------------------

    def _fail_queued(self, why: str) -> None:
        while self._queue:
            self._fail(self._queue.popleft(), why)

    def _fail_running(self, why: str) -> None:
        running, self._running = self._running, []
        for item in running:
            self._fail(item, why)

    def _fail(self, item: _Item[Key], why: str) -> None:
        if item.state is not _State.DONE and not item.future.done():
            self._counters.closed += 1
            item.future.set_exception(ChannelClosed(f"{self.name}: item {item.key!r}: {why}"))
        item.state = _State.DONE

    # --- stats -------------------------------------------------------------------------------

    @property
    def stats(self) -> BatcherStats:
        """A snapshot of the counters and of the recent wait and compute times."""
        c = self._counters
        return BatcherStats(
            name=self.name,
            max_batch=self.max_batch,
            max_queue=self.max_queue,
            queue_depth=len(self._queue),
            high_water=c.high_water,
            submitted=c.submitted,
            completed=c.completed,
            failed=c.failed,
            cancelled=c.cancelled,
            rejected=c.rejected,
            invalid=c.invalid,
            closed=c.closed,
            batches=c.batches,
            batch_errors=c.batch_errors,
            items=c.items,
            mean_fill=c.items / (c.batches * self.max_batch) if c.batches else 0.0,
            last_fill=c.last_fill,
            wait_ms_p50=_percentile_ms(c.wait_ns, 50),
            wait_ms_p95=_percentile_ms(c.wait_ns, 95),
            compute_ms_p50=_percentile_ms(c.compute_ns, 50),
            compute_ms_p95=_percentile_ms(c.compute_ns, 95),
        )


def _percentile_ms(samples_ns: deque[int], q: float) -> float | None:
    if not samples_ns:
        return None
    return (
        float(np.percentile(np.fromiter(samples_ns, dtype=np.float64, count=len(samples_ns)), q))
        / _NS_PER_MS
    )


def _describe(signature: Mapping[str, tuple[tuple[int, ...], np.dtype[Any]]]) -> str:
    return ", ".join(f"{name} {shape} {dtype}" for name, (shape, dtype) in signature.items())
