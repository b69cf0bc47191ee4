"""The cross-stream batcher: flushing, routing, back-pressure, failures, cancellation, shutdown."""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from engine.core.clock import VirtualClock
from engine.core.errors import ChannelClosed, EngineError, Overloaded, StageError
from engine.runtime.batcher import Batcher, BatcherStats

from .conftest import scaled

Inputs = Mapping[str, npt.NDArray[Any]]
Key = tuple[str, int, int]


class Doubler:
    """A real run_batch: returns ``x * 2``, records what it saw, on which thread, how often.

    Raises ValueError on a batch holding a negative value. ``gate`` holds every batch until set;
    ``clock`` is advanced by ``compute_ns`` per batch (virtual compute time).
    """

    def __init__(
        self,
        *,
        delay_s: float = 0.0,
        gate: threading.Event | None = None,
        clock: VirtualClock | None = None,
        compute_ns: int = 0,
    ) -> None:
        self.delay_s = delay_s
        self.gate = gate
        self.clock = clock
        self.compute_ns = compute_ns
        self.sizes: list[int] = []
        self.seen: list[float] = []
        self.threads: set[str] = set()
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()

    def __call__(self, inputs: Inputs) -> npt.NDArray[Any]:
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            x = inputs["x"]
            self.threads.add(threading.current_thread().name)
            self.sizes.append(len(x))
            self.seen.extend(float(row[0]) for row in x)
            if self.gate is not None:
                self.gate.wait(scaled(10))
            if self.delay_s:
                time.sleep(self.delay_s)
            if self.clock is not None:
                self.clock.advance(self.compute_ns)
            if (x < 0).any():
                raise ValueError("negative input")
            result: npt.NDArray[Any] = x * 2
            return result
        finally:
            with self._lock:
                self.active -= 1


def item(value: float, dim: int = 4) -> dict[str, npt.NDArray[np.float32]]:
    return {"x": np.full(dim, value, dtype=np.float32)}


def make(model: Callable[[Inputs], npt.NDArray[Any]], **options: Any) -> Batcher[Key]:
    settings: dict[str, Any] = {"max_batch": 4, "max_wait_ms": 5.0, "max_queue": 16}
    settings.update(options)
    return Batcher(model, name="test", **settings)


async def until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Poll the loop until the predicate holds (state reached by another task or thread)."""
    deadline = time.monotonic() + scaled(timeout_s)
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.002)


# --- flushing ----------------------------------------------------------------------------------


async def test_flushes_when_max_batch_items_wait() -> None:
    model = Doubler()
    async with make(model, max_batch=4, max_wait_ms=60_000) as batcher:
        items = [(("s", 0, i), item(i)) for i in range(8)]
        rows = await asyncio.wait_for(batcher.submit_many(items), scaled(5))
    assert model.sizes == [4, 4]
    assert [float(r[0]) for r in rows] == [2.0 * i for i in range(8)]
    assert rows[3].shape == (4,)


async def test_flushes_a_partial_batch_after_max_wait() -> None:
    model = Doubler()
    async with make(model, max_batch=8, max_wait_ms=30) as batcher:
        items = [(("s", 0, i), item(i)) for i in range(3)]
        rows = await asyncio.wait_for(batcher.submit_many(items), scaled(5))
        stats = batcher.stats
    assert model.sizes == [3]
    assert [float(r[0]) for r in rows] == [0.0, 2.0, 4.0]
    # The flush never comes before the deadline (the worker re-checks the clock).
    assert stats.wait_ms_p50 is not None and stats.wait_ms_p50 >= 30.0


async def test_timings_and_fill_on_virtual_time() -> None:
    clock = VirtualClock()
    model = Doubler(clock=clock, compute_ns=5_000_000)
    batcher = Batcher[Key](model, max_batch=4, max_wait_ms=20, max_queue=8, name="v", clock=clock)
    empty = batcher.stats
    assert (empty.wait_ms_p50, empty.compute_ms_p95, empty.mean_fill) == (None, None, 0.0)
    async with batcher:
        await batcher.submit_many([(("s", 0, i), item(i)) for i in range(3)])  # waits 20 ms
        await batcher.submit_many([(("s", 1, i), item(i)) for i in range(4)])  # full at once
        stats = batcher.stats
    assert model.sizes == [3, 4]
    assert stats == BatcherStats(
        name="v",
        max_batch=4,
        max_queue=8,
        queue_depth=0,
        high_water=4,
        submitted=7,
        completed=7,
        failed=0,
        cancelled=0,
        rejected=0,
        invalid=0,
        closed=0,
        batches=2,
        batch_errors=0,
        items=7,
        mean_fill=7 / 8,
        last_fill=1.0,
        wait_ms_p50=0.0,  # waits [20, 20, 20, 0, 0, 0, 0] ms
        wait_ms_p95=20.0,
        compute_ms_p50=5.0,
        compute_ms_p95=5.0,
    )


# --- routing -----------------------------------------------------------------------------------


async def test_routes_100_concurrent_submits_from_several_streams() -> None:
    model = Doubler()
    rng = random.Random(5)
    results: dict[Key, npt.NDArray[Any]] = {}
    inputs: dict[Key, npt.NDArray[np.float32]] = {}

    async def one(batcher: Batcher[Key], key: Key) -> None:
        for _ in range(rng.randrange(4)):  # interleave the streams
            await asyncio.sleep(0)
        results[key] = await batcher.submit(key, {"x": inputs[key]})

    async with make(model, max_batch=16, max_wait_ms=5, max_queue=128) as batcher:
        keys = [(f"stream{s}", t, pts) for s in range(5) for t in range(2) for pts in range(10)]
        for n, key in enumerate(keys):
            inputs[key] = np.arange(8, dtype=np.float32) + 1000 * n
        rng.shuffle(keys)
        async with asyncio.TaskGroup() as group:
            for key in keys:
                group.create_task(one(batcher, key), name=f"submit {key}")
        stats = batcher.stats
    assert len(results) == 100
    for key, row in results.items():
        np.testing.assert_array_equal(row, inputs[key] * 2)
    assert sum(model.sizes) == 100 and max(model.sizes) <= 16
    assert max(model.sizes) > 1  # batched across streams
    assert stats.completed == 100 and stats.items == 100 and stats.batches == len(model.sizes)


async def test_equal_keys_from_two_callers_each_get_their_own_row() -> None:
    async with make(Doubler(), max_batch=2, max_wait_ms=60_000) as batcher:
        key = ("s", 0, 0)
        a, b = await asyncio.gather(batcher.submit(key, item(1)), batcher.submit(key, item(2)))
    assert (float(a[0]), float(b[0])) == (2.0, 4.0)


# --- the event loop and the thread -------------------------------------------------------------


async def test_the_model_runs_off_the_loop_one_batch_at_a_time() -> None:
    model = Doubler(delay_s=0.3)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    async with make(model, max_batch=2, max_wait_ms=0) as batcher:
        tick_task = asyncio.create_task(ticker(), name="ticker")
        try:
            await batcher.submit(("s", 0, 0), item(1))
        finally:
            tick_task.cancel()
            await asyncio.gather(tick_task, return_exceptions=True)
    assert ticks >= 5  # ~30 ticks in 0.3 s; a blocked loop would get none
    assert model.threads and all(name.startswith("test") for name in model.threads)
    assert threading.main_thread().name not in model.threads


async def test_one_batch_at_a_time_on_a_shared_executor() -> None:
    model = Doubler(delay_s=0.01)
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        async with make(model, max_batch=2, max_wait_ms=0, executor=pool) as batcher:
            rows = await batcher.submit_many([(("s", 0, i), item(i)) for i in range(10)])
        assert [float(r[0]) for r in rows] == [2.0 * i for i in range(10)]
        assert not pool._shutdown  # a given executor is not the batcher's to shut down
    assert model.max_active == 1
    assert len(model.sizes) >= 5


# --- back-pressure -----------------------------------------------------------------------------


async def test_full_queue_makes_submit_wait_and_try_submit_refuse() -> None:
    gate = threading.Event()
    model = Doubler(gate=gate)
    try:
        async with make(model, max_batch=1, max_wait_ms=0, max_queue=2) as batcher:
            running = asyncio.create_task(batcher.submit(("s", 0, 0), item(0)))
            await until(lambda: model.sizes == [1])  # blocked in run_batch
            queued = [asyncio.create_task(batcher.submit(("s", 0, i), item(i))) for i in (1, 2)]
            await until(lambda: batcher.stats.queue_depth == 2)
            waiting = asyncio.create_task(batcher.submit(("s", 0, 3), item(3)))
            await asyncio.sleep(0.05)
            assert not waiting.done() and batcher.stats.queue_depth == 2
            with pytest.raises(Overloaded) as refused:
                await batcher.try_submit(("s", 0, 4), item(4))
            assert refused.value.retryable and isinstance(refused.value, EngineError)
            gate.set()
            rows = await asyncio.wait_for(asyncio.gather(running, *queued, waiting), scaled(5))
            stats = batcher.stats
    finally:
        gate.set()
    assert [float(r[0]) for r in rows] == [0.0, 2.0, 4.0, 6.0]
    assert model.seen == [0.0, 1.0, 2.0, 3.0]  # arrival order, the waiter last
    assert (stats.rejected, stats.high_water, stats.submitted) == (1, 2, 4)


async def test_a_cancelled_waiter_passes_its_turn_on() -> None:
    gate = threading.Event()
    model = Doubler(gate=gate)
    try:
        async with make(model, max_batch=1, max_wait_ms=0, max_queue=1) as batcher:
            running = asyncio.create_task(batcher.submit(("s", 0, 0), item(0)))
            await until(lambda: model.sizes == [1])
            queued = asyncio.create_task(batcher.submit(("s", 0, 1), item(1)))
            await until(lambda: batcher.stats.queue_depth == 1)
            first = asyncio.create_task(batcher.submit(("s", 0, 2), item(2)))
            second = asyncio.create_task(batcher.submit(("s", 0, 3), item(3)))
            await asyncio.sleep(0.02)
            first.cancel()
            gate.set()
            rows = await asyncio.wait_for(asyncio.gather(running, queued, second), scaled(5))
            with pytest.raises(asyncio.CancelledError):
                await first
    finally:
        gate.set()
    assert [float(r[0]) for r in rows] == [0.0, 2.0, 6.0]
    assert model.seen == [0.0, 1.0, 3.0]


# --- failures ----------------------------------------------------------------------------------


async def test_an_error_in_run_batch_fails_only_that_batch() -> None:
    model = Doubler()
    async with make(model, max_batch=2, max_wait_ms=60_000) as batcher:
        values = [1.0, -1.0, 2.0, 3.0]  # batches [1, -1] and [2, 3]
        outcomes = await asyncio.gather(
            *(batcher.submit(("s", 0, i), item(v)) for i, v in enumerate(values)),
            return_exceptions=True,
        )
        after = await batcher.submit_many([(("s", 0, 9), item(4)), (("s", 0, 10), item(5))])
        stats = batcher.stats
    for failed in outcomes[:2]:
        assert isinstance(failed, StageError)
        assert isinstance(failed.__cause__, ValueError)
        assert "run_batch failed" in str(failed) and "negative input" in str(failed)
    assert "('s', 0, 1)" in str(outcomes[1])
    assert [float(r[0]) for r in outcomes[2:]] == [4.0, 6.0]  # type: ignore[index]
    assert [float(r[0]) for r in after] == [8.0, 10.0]
    assert (stats.batch_errors, stats.failed, stats.completed) == (1, 2, 4)


async def test_a_bad_output_shape_fails_the_batch() -> None:
    def short(inputs: Inputs) -> npt.NDArray[Any]:
        return np.zeros((1, 3))

    async with make(short, max_batch=2, max_wait_ms=60_000) as batcher:
        outcomes = await asyncio.gather(
            batcher.submit(("s", 0, 0), item(0)),
            batcher.submit(("s", 0, 1), item(1)),
            return_exceptions=True,
        )
    assert all(isinstance(o, StageError) and "(1, 3)" in str(o) for o in outcomes)


async def test_submit_many_withdraws_the_rest_on_failure() -> None:
    model = Doubler()
    async with make(model, max_batch=1, max_wait_ms=0) as batcher:
        with pytest.raises(StageError):
            await batcher.submit_many([(("s", 0, i), item(v)) for i, v in enumerate([-1, 1, 2])])
        row = await batcher.submit(("s", 0, 3), item(3))
        stats = batcher.stats
    assert float(row[0]) == 6.0
    assert stats.failed == 1 and stats.queue_depth == 0
    assert stats.cancelled + stats.completed == 3  # the other two: withdrawn or discarded


async def test_inputs_that_do_not_match_are_refused_at_their_own_submit() -> None:
    model = Doubler()
    async with make(model, max_batch=2, max_wait_ms=20) as batcher:
        good = asyncio.create_task(batcher.submit(("s", 0, 0), item(1)))
        await asyncio.sleep(0)
        with pytest.raises(ValueError, match=r"\('s', 0, 1\).*\(5,\)"):
            await batcher.submit(("s", 0, 1), item(1, dim=5))
        with pytest.raises(ValueError, match="float64"):
            await batcher.submit(("s", 0, 2), {"x": np.ones(4)})
        with pytest.raises(ValueError, match="y"):
            await batcher.submit(("s", 0, 3), {**item(1), "y": np.ones(4, np.float32)})
        with pytest.raises(ValueError):
            await batcher.submit_many([(("s", 0, 4), item(1)), (("s", 0, 5), {})])
        also_good = await batcher.submit(("s", 0, 6), item(2))
        assert float((await good)[0]) == 2.0 and float(also_good[0]) == 4.0
        stats = batcher.stats
    assert stats.invalid == 4 and stats.submitted == 2
    assert model.seen == [1.0, 2.0]


async def test_an_input_spec_fixes_the_signature_up_front() -> None:
    spec = {"x": ((4,), np.float32)}
    async with make(Doubler(), input_spec=spec) as batcher:
        with pytest.raises(ValueError, match="expected"):
            await batcher.submit(("s", 0, 0), item(1, dim=3))
        assert float((await batcher.submit(("s", 0, 1), item(1)))[0]) == 2.0


# --- cancellation ------------------------------------------------------------------------------


async def test_cancelling_a_queued_submit_removes_it() -> None:
    gate = threading.Event()
    model = Doubler(gate=gate)
    try:
        async with make(model, max_batch=1, max_wait_ms=0) as batcher:
            running = asyncio.create_task(batcher.submit(("s", 0, 0), item(0)))
            await until(lambda: model.sizes == [1])
            doomed = asyncio.create_task(batcher.submit(("s", 0, 1), item(1)))
            kept = asyncio.create_task(batcher.submit(("s", 0, 2), item(2)))
            await until(lambda: batcher.stats.queue_depth == 2)
            doomed.cancel()
            with pytest.raises(asyncio.CancelledError):
                await doomed
            assert batcher.stats.queue_depth == 1
            gate.set()
            rows = await asyncio.wait_for(asyncio.gather(running, kept), scaled(5))
            stats = batcher.stats
    finally:
        gate.set()
    assert [float(r[0]) for r in rows] == [0.0, 4.0]
    assert model.seen == [0.0, 2.0]  # the cancelled item never ran
    assert (stats.cancelled, stats.completed) == (1, 2)


async def test_cancelling_a_running_submit_discards_its_row_only() -> None:
    gate = threading.Event()
    model = Doubler(gate=gate)
    try:
        async with make(model, max_batch=2, max_wait_ms=60_000) as batcher:
            doomed = asyncio.create_task(batcher.submit(("s", 0, 0), item(1)))
            kept = asyncio.create_task(batcher.submit(("s", 0, 1), item(2)))
            await until(lambda: model.sizes == [2])
            doomed.cancel()
            with pytest.raises(asyncio.CancelledError):
                await doomed
            gate.set()
            row = await asyncio.wait_for(kept, scaled(5))
            stats = batcher.stats
    finally:
        gate.set()
    assert float(row[0]) == 4.0
    assert (stats.cancelled, stats.completed, stats.items) == (1, 1, 2)


# --- shutdown ----------------------------------------------------------------------------------


async def test_close_without_drain_fails_pending_items_within_the_deadline() -> None:
    gate = threading.Event()
    model = Doubler(gate=gate)
    try:
        batcher = make(model, max_batch=1, max_wait_ms=0, max_queue=2)
        async with batcher:
            running = asyncio.create_task(batcher.submit(("s", 0, 0), item(0)))
            await until(lambda: model.sizes == [1])
            queued = [asyncio.create_task(batcher.submit(("s", 0, i), item(i))) for i in (1, 2)]
            await until(lambda: batcher.stats.queue_depth == 2)
            waiting = asyncio.create_task(batcher.submit(("s", 0, 3), item(3)))
            await asyncio.sleep(0.01)
            started = time.monotonic()
            await batcher.aclose(drain=False, timeout_s=0.1)  # the model stays blocked
            assert time.monotonic() - started < scaled(2)
            outcomes = await asyncio.gather(running, *queued, waiting, return_exceptions=True)
            await batcher.aclose()  # idempotent
            with pytest.raises(ChannelClosed):
                await batcher.submit(("s", 0, 4), item(4))
            with pytest.raises(ChannelClosed):
                await batcher.try_submit(("s", 0, 5), item(5))
    finally:
        gate.set()
    assert all(isinstance(o, ChannelClosed) for o in outcomes), outcomes
    assert "batch ran" in str(outcomes[0]) and "before the item ran" in str(outcomes[1])
    assert batcher.closed and batcher.stats.closed == 3
    assert model.seen == [0.0]


async def test_close_with_drain_runs_what_is_queued_without_waiting_for_a_full_batch() -> None:
    model = Doubler(delay_s=0.02)
    batcher = make(model, max_batch=2, max_wait_ms=60_000)
    async with batcher:
        tasks = [asyncio.create_task(batcher.submit(("s", 0, i), item(i))) for i in range(3)]
        await asyncio.sleep(0)
        await asyncio.wait_for(batcher.aclose(drain=True), scaled(5))
        rows = await asyncio.gather(*tasks)
    assert [float(r[0]) for r in rows] == [0.0, 2.0, 4.0]
    assert model.sizes == [2, 1]


async def test_usage_errors() -> None:
    with pytest.raises(ValueError):
        Batcher[Key](Doubler(), max_batch=0, max_wait_ms=1, max_queue=4)
    with pytest.raises(ValueError, match="max_queue"):
        Batcher[Key](Doubler(), max_batch=8, max_wait_ms=1, max_queue=4)
    with pytest.raises(ValueError):
        Batcher[Key](Doubler(), max_batch=1, max_wait_ms=-1, max_queue=4)
    batcher = make(Doubler())
    with pytest.raises(RuntimeError, match="enter"):
        await batcher.submit(("s", 0, 0), item(0))
    async with batcher:
        with pytest.raises(RuntimeError):
            await batcher.__aenter__()
    with pytest.raises(RuntimeError):
        await batcher.__aenter__()


class WorkerBug(BaseException):
    """Escapes the per-batch `except Exception`, as a bug in the worker would."""


async def test_a_dead_worker_fails_every_waiter_and_aclose_reports_it() -> None:
    def broken(inputs: Inputs) -> npt.NDArray[Any]:
        raise WorkerBug("boom")

    batcher = make(broken, max_batch=1, max_wait_ms=0, max_queue=4)
    async with asyncio.timeout(scaled(5)):
        await batcher.__aenter__()
        outcomes = await asyncio.gather(
            *(batcher.submit(("s", 0, i), item(i)) for i in range(3)), return_exceptions=True
        )
        assert all(isinstance(o, ChannelClosed) for o in outcomes), outcomes
        assert batcher.closed
        with pytest.raises(ChannelClosed):
            await batcher.submit(("s", 0, 9), item(9))
        with pytest.raises(StageError, match="worker failed") as failed:
            await batcher.aclose()
        assert isinstance(failed.value.__cause__, WorkerBug)
        await batcher.aclose()  # idempotent, and quiet the second time
