"""Frame, channel and pipeline semantics: drop policies counted, cancellation, shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import pytest

from engine.core.channel import Channel, FullPolicy
from engine.core.clock import VirtualClock
from engine.core.errors import ChannelClosed, ConcurrencyError, StageError
from engine.core.frame import Frame, FrameKind, audio_frame, merge_gap, video_frame
from engine.core.stage import Pipeline, ProcessorStage, run_stage


def chunk(seq: int, samples: int = 160) -> Frame:
    return audio_frame(
        np.full(samples, seq, dtype=np.int16),
        pts_ns=seq * 10_000_000,
        seq=seq,
        stream_id="s",
        sample_rate_hz=16000,
    )


# --- Frame -----------------------------------------------------------------------------------


def test_frame_is_immutable_and_payload_read_only() -> None:
    frame = chunk(3)
    with pytest.raises(AttributeError):
        frame.pts_ns = 5  # type: ignore[misc]
    with pytest.raises(ValueError):
        frame.data[0] = 1
    assert frame.duration_ns == 10_000_000
    assert frame.end_pts_ns == 40_000_000


def test_frame_refuses_float_pts_and_audio_without_rate() -> None:
    with pytest.raises(TypeError):
        Frame(pts_ns=0.5, seq=0, stream_id="s", kind=FrameKind.VIDEO, data=np.zeros(1))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Frame(pts_ns=0, seq=0, stream_id="s", kind=FrameKind.AUDIO, data=np.zeros(1))


def test_video_frame_keeps_source_pts_in_read_only_meta() -> None:
    frame = video_frame(
        np.zeros((2, 2, 3), np.uint8), pts_ns=40_000_000, seq=1, stream_id="s", src_pts_ns=33
    )
    assert frame.meta["src_pts_ns"] == 33
    with pytest.raises(TypeError):
        frame.meta["x"] = 1  # type: ignore[index]


# --- Channel ---------------------------------------------------------------------------------


def test_channel_requires_capacity_and_matching_gap_hook() -> None:
    with pytest.raises(ValueError):
        Channel[int](0, FullPolicy.WAIT)
    with pytest.raises(ValueError):
        Channel[int](4, FullPolicy.MARK_GAP)
    with pytest.raises(ValueError):
        Channel[Frame](4, FullPolicy.WAIT, on_gap=merge_gap)


async def test_wait_policy_applies_back_pressure() -> None:
    channel = Channel[int](2, FullPolicy.WAIT)
    await channel.send(1)
    await channel.send(2)
    blocked = asyncio.create_task(channel.send(3))
    await asyncio.sleep(0.01)
    assert not blocked.done()
    assert await channel.recv() == 1
    await asyncio.wait_for(blocked, 1)
    assert [await channel.recv(), await channel.recv()] == [2, 3]
    assert channel.stats.dropped == 0
    assert channel.stats.high_water == 2
    assert channel.send_nowait(4) and channel.send_nowait(5)
    assert not channel.send_nowait(6)


async def test_drop_oldest_counts_drops_and_keeps_newest() -> None:
    channel = Channel[int](3, FullPolicy.DROP_OLDEST)
    for value in range(10):
        await channel.send(value)
    assert channel.stats.dropped == 7
    channel.close()
    assert [v async for v in channel] == [7, 8, 9]


async def test_mark_gap_leaves_one_merged_marker_where_items_were_lost() -> None:
    channel = Channel[Frame](3, FullPolicy.MARK_GAP, on_gap=merge_gap)
    for seq in range(8):
        await channel.send(chunk(seq))
    channel.close()
    received = [f async for f in channel]
    assert channel.stats.dropped == 5
    gap, *rest = received
    assert gap.kind is FrameKind.GAP
    assert gap.meta["dropped"] == 5
    assert gap.meta["first_pts_ns"] == 0 and gap.meta["last_pts_ns"] == 40_000_000
    assert gap.meta["end_pts_ns"] == 50_000_000
    assert [f.seq for f in rest] == [5, 6, 7]


async def test_mark_gap_starts_a_new_marker_after_the_consumer_took_one() -> None:
    channel = Channel[Frame](1, FullPolicy.MARK_GAP, on_gap=merge_gap)
    await channel.send(chunk(0))
    await channel.send(chunk(1))
    first_gap = await channel.recv()
    assert first_gap.kind is FrameKind.GAP and first_gap.meta["dropped"] == 1
    await channel.send(chunk(2))
    second_gap = await channel.recv()
    assert second_gap.kind is FrameKind.GAP and second_gap.meta["first_pts_ns"] == 10_000_000
    assert (await channel.recv()).seq == 2


async def test_close_drains_then_raises_and_refuses_sends() -> None:
    channel = Channel[int](4, FullPolicy.WAIT)
    await channel.send(1)
    channel.close()
    channel.close()  # idempotent
    with pytest.raises(ChannelClosed):
        await channel.send(2)
    assert await channel.recv() == 1
    with pytest.raises(ChannelClosed):
        await channel.recv()


async def test_close_wakes_a_waiting_receiver_and_blocked_senders() -> None:
    channel = Channel[int](1, FullPolicy.WAIT)
    receiver = asyncio.create_task(channel.recv())
    await asyncio.sleep(0)
    channel.close()
    with pytest.raises(ChannelClosed):
        await receiver
    full = Channel[int](1, FullPolicy.WAIT)
    await full.send(1)
    sender = asyncio.create_task(full.send(2))
    await asyncio.sleep(0)
    assert full.discard() == 1
    assert full.stats.discarded == 1
    with pytest.raises(ChannelClosed):
        await sender


async def test_second_concurrent_consumer_is_refused() -> None:
    channel = Channel[int](1, FullPolicy.WAIT)
    first = asyncio.create_task(channel.recv())
    await asyncio.sleep(0)
    with pytest.raises(ConcurrencyError):
        await channel.recv()
    await channel.send(7)
    assert await first == 7


async def test_cancelled_sender_leaves_the_channel_consistent() -> None:
    channel = Channel[int](1, FullPolicy.WAIT)
    await channel.send(1)
    sender = asyncio.create_task(channel.send(2))
    await asyncio.sleep(0)
    sender.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sender
    assert await channel.recv() == 1
    await channel.send(3)
    assert await channel.recv() == 3


# --- Clock -----------------------------------------------------------------------------------


async def test_virtual_clock_jumps_to_deadlines() -> None:
    clock = VirtualClock(start_ns=100)
    await clock.sleep_until(1_000)
    await clock.sleep_until(500)  # in the past: no time passes
    assert clock.now_ns() == 1_000 and clock.slept_ns == 900
    with pytest.raises(ValueError):
        clock.advance(-1)


# --- Stages and pipelines --------------------------------------------------------------------


async def numbers(count: int, delay_s: float = 0.0) -> AsyncIterator[int]:
    for value in range(count):
        if delay_s:
            await asyncio.sleep(delay_s)
        yield value


class Doubler:
    name = "double"

    async def run(self, src: AsyncIterator[int]) -> AsyncIterator[int]:
        async for value in src:
            yield value * 2


class Pairs:
    """Emits one output per two inputs, and the odd one out at the end (a stateful stage)."""

    name = "pairs"

    async def run(self, src: AsyncIterator[int]) -> AsyncIterator[tuple[int, ...]]:
        held: list[int] = []
        async for value in src:
            held.append(value)
            if len(held) == 2:
                yield tuple(held)
                held = []
        if held:
            yield tuple(held)


async def odd_only(value: int) -> int | None:
    return value if value % 2 else None


async def test_run_stage_helper() -> None:
    assert await run_stage(Pairs(), [1, 2, 3]) == [(1, 2), (3,)]
    assert await run_stage(ProcessorStage(odd_only), [1, 2, 3]) == [1, 3]


async def test_pipeline_composes_stages_in_order_and_ends_with_the_source() -> None:
    stages = [ProcessorStage(odd_only, name="odd"), Doubler(), Pairs()]
    async with Pipeline(numbers(10), stages, capacity=2) as pipe:
        out = [item async for item in pipe.outputs()]
    assert out == [(2, 6), (10, 14), (18,)]
    assert all(link.stats.dropped == 0 for link in pipe.stats)
    assert pipe.stats[0].stats.sent == 10


async def test_stage_failure_stops_the_pipeline_with_stage_error() -> None:
    async def explode(value: int) -> int:
        if value == 3:
            raise RuntimeError("boom")
        return value

    async with Pipeline(numbers(100), [ProcessorStage(explode, name="explode")]) as pipe:
        seen = []
        with pytest.raises(StageError, match="explode.*boom"):
            async for item in pipe.outputs():
                seen.append(item)
    assert seen == [0, 1, 2]


async def test_source_failure_surfaces_as_stage_error() -> None:
    async def broken() -> AsyncIterator[int]:
        yield 1
        raise OSError("disk gone")

    async with Pipeline(broken(), [Doubler()]) as pipe:
        with pytest.raises(StageError, match="source failed: disk gone"):
            _ = [item async for item in pipe.outputs()]


async def test_drain_stops_intake_and_delivers_what_is_in_flight() -> None:
    pipe = Pipeline(numbers(1_000_000, delay_s=0.001), [Doubler()], capacity=4)
    received: list[int] = []
    five_in = asyncio.Event()

    async def reader() -> None:
        async for item in pipe.outputs():
            received.append(item)
            if len(received) == 5:
                five_in.set()

    async with pipe:
        reading = asyncio.create_task(reader())
        await asyncio.wait_for(five_in.wait(), 5)
        await pipe.aclose(drain=True, timeout_s=2)
        await asyncio.wait_for(reading, 2)
    assert received == [2 * i for i in range(len(received))]  # nothing lost, nothing reordered
    sent = pipe.stats[0].stats.sent
    assert len(received) == sent  # everything taken in reached the output
    assert sent < 1_000_000


async def test_discard_cancels_everything_and_counts_what_it_threw_away() -> None:
    gate = asyncio.Event()

    async def stuck(value: int) -> int:
        await gate.wait()
        return value

    async with Pipeline(numbers(50), [ProcessorStage(stuck, name="stuck")], capacity=4) as pipe:
        await asyncio.sleep(0.05)
        await pipe.aclose(drain=False)
        await pipe.aclose(drain=False)  # idempotent
    assert sum(link.stats.discarded for link in pipe.stats) > 0


async def test_drain_deadline_falls_back_to_cancel() -> None:
    async def forever(value: int) -> int:
        await asyncio.sleep(3600)
        return value

    async with Pipeline(numbers(5), [ProcessorStage(forever, name="forever")]) as pipe:
        await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await pipe.aclose(drain=True, timeout_s=0.2)
        assert loop.time() - started < 2


async def test_cancelling_the_consumer_task_cancels_the_pipeline() -> None:
    async def consume() -> None:
        async with Pipeline(numbers(10**9, delay_s=0.001), [Doubler()]) as pipe:
            async for _ in pipe.outputs():
                pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
