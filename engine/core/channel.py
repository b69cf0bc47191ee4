"""Bounded single-consumer channels with a named policy for when they are full.

Every queue between two stages is a :class:`Channel`. Capacity and full-policy are required
arguments: there is no "0 means unbounded", because unbounded queues are how live latency grows
without limit. Drops are counted, and the ``MARK_GAP`` policy puts a marker in the stream where
items were lost, so that a consumer of audio knows samples are missing.

Loop affinity: a channel belongs to one event loop; call it from that loop only.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from engine.core.errors import ChannelClosed, ConcurrencyError

T = TypeVar("T")


class FullPolicy(enum.Enum):
    """What ``send`` does when the channel holds ``capacity`` items."""

    WAIT = "wait"
    """Wait for room (back-pressure to the producer)."""
    DROP_OLDEST = "drop-oldest"
    """Drop the oldest queued item and count it (live video)."""
    MARK_GAP = "mark-gap"
    """Drop the oldest item, count it, and leave a gap marker in its place (audio)."""


@dataclass
class ChannelStats:
    """Counters of one channel; read them at any time."""

    sent: int = 0
    received: int = 0
    dropped: int = 0
    discarded: int = 0
    high_water: int = 0


class Channel(Generic[T]):
    """A bounded FIFO between one or more producers and exactly one consumer.

    After :meth:`close`, :meth:`recv` still returns what is queued, then raises
    :class:`ChannelClosed`; :meth:`send` raises at once.

    Args:
        capacity: the most items held (not counting a gap marker); at least 1.
        full: what ``send`` does when full.
        on_gap: with ``MARK_GAP``, builds the marker from the marker already at the head
            (or None) and the item being dropped; required for that policy only.
        name: shown in stats and errors.
    """

    def __init__(
        self,
        capacity: int,
        full: FullPolicy,
        *,
        on_gap: Callable[[T | None, T], T] | None = None,
        name: str = "channel",
    ) -> None:
        """See the class docstring."""
        if capacity < 1:
            raise ValueError(f"{name}: capacity must be at least 1, got {capacity}")
        if (full is FullPolicy.MARK_GAP) != (on_gap is not None):
            raise ValueError(f"{name}: on_gap is required with MARK_GAP and only with it")
        self.capacity = capacity
        self.full = full
        self.name = name
        self.stats = ChannelStats()
        self._on_gap = on_gap
        self._items: deque[T] = deque()
        self._head_is_marker = False
        self._closed = False
        self._receiving = False
        self._recv_waiter: asyncio.Future[None] | None = None
        self._send_waiters: deque[asyncio.Future[None]] = deque()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    def __len__(self) -> int:
        """Items queued now, a gap marker included."""
        return len(self._items)

    def _depth(self) -> int:
        return len(self._items) - (1 if self._head_is_marker else 0)

    async def send(self, item: T) -> None:
        """Queue one item, applying the full-policy when there is no room.

        Raises:
            ChannelClosed: the channel is closed (before or while waiting for room).
        """
        if self._closed:
            raise ChannelClosed(f"{self.name}: send on a closed channel")
        if self.full is FullPolicy.WAIT:
            while self._depth() >= self.capacity:
                await self._wait_for_room()
        self._put(item)

    def send_nowait(self, item: T) -> bool:
        """Queue one item without waiting.

        Returns:
            False when a ``WAIT`` channel is full (nothing queued); True otherwise.

        Raises:
            ChannelClosed: the channel is closed.
        """
        if self._closed:
            raise ChannelClosed(f"{self.name}: send on a closed channel")
        if self.full is FullPolicy.WAIT and self._depth() >= self.capacity:
            return False
        self._put(item)
        return True

    async def _wait_for_room(self) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._send_waiters.append(waiter)
        try:
            await waiter
        finally:
            if waiter in self._send_waiters:
                self._send_waiters.remove(waiter)
        if self._closed:
            raise ChannelClosed(f"{self.name}: closed while waiting for room")

    def _put(self, item: T) -> None:
        if self._depth() >= self.capacity:
            self._drop_one()
        self._items.append(item)
        self.stats.sent += 1
        self.stats.high_water = max(self.stats.high_water, self._depth())
        self._wake(self._recv_waiter)

    def _drop_one(self) -> None:
        self.stats.dropped += 1
        if self._on_gap is None:
            self._items.popleft()
            return
        if self._head_is_marker:
            marker = self._items.popleft()
            victim = self._items.popleft()
            self._items.appendleft(self._on_gap(marker, victim))
        else:
            victim = self._items.popleft()
            self._items.appendleft(self._on_gap(None, victim))
            self._head_is_marker = True

    async def recv(self) -> T:
        """Take the oldest item, waiting for one if the channel is empty.

        Raises:
            ChannelClosed: the channel is closed and empty.
            ConcurrencyError: another task is already waiting in ``recv``.
        """
        if self._receiving:
            raise ConcurrencyError(f"{self.name}: a second consumer called recv()")
        self._receiving = True
        try:
            while not self._items:
                if self._closed:
                    raise ChannelClosed(f"{self.name}: closed and drained")
                waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._recv_waiter = waiter
                try:
                    await waiter
                finally:
                    self._recv_waiter = None
            return self._take()
        finally:
            self._receiving = False

    def recv_nowait(self) -> T | None:
        """Take the oldest item, or None when the channel is empty."""
        return self._take() if self._items else None

    def _take(self) -> T:
        item = self._items.popleft()
        self._head_is_marker = False
        self.stats.received += 1
        while self._send_waiters:
            waiter = self._send_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break
        return item

    def close(self) -> None:
        """Refuse further sends; the consumer drains what is queued. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._wake(self._recv_waiter)
        while self._send_waiters:
            self._wake(self._send_waiters.popleft())

    def discard(self) -> int:
        """Close and throw away whatever is queued (counted in ``stats.discarded``).

        Returns:
            How many items were thrown away.
        """
        self.close()
        count = len(self._items)
        self._items.clear()
        self._head_is_marker = False
        self.stats.discarded += count
        return count

    @staticmethod
    def _wake(waiter: asyncio.Future[None] | None) -> None:
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __aiter__(self) -> Channel[T]:
        """Iterate until the channel is closed and drained."""
        return self

    async def __anext__(self) -> T:
        """The next item; stops when the channel is closed and drained."""
        try:
            return await self.recv()
        except ChannelClosed:
            raise StopAsyncIteration from None
