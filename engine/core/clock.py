"""Clocks: where "now" comes from, injected so that tests can run on virtual time."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

from engine.core.frame import NS_PER_S


class Clock(Protocol):
    """A monotonic clock in nanoseconds that can also wait.

    Loop affinity: ``sleep_until`` must be awaited on the event loop that uses the clock.
    """

    def now_ns(self) -> int:
        """Current time in ns on this clock's monotonic timeline."""
        ...

    async def sleep_until(self, deadline_ns: int) -> None:
        """Return once ``now_ns() >= deadline_ns`` (at once if already past)."""
        ...


class SystemClock:
    """The real clock: ``time.monotonic_ns`` and ``asyncio.sleep``."""

    def now_ns(self) -> int:
        """Current monotonic time in ns."""
        return time.monotonic_ns()

    async def sleep_until(self, deadline_ns: int) -> None:
        """Sleep on the event loop until the deadline."""
        delay_ns = deadline_ns - time.monotonic_ns()
        if delay_ns > 0:
            await asyncio.sleep(delay_ns / NS_PER_S)


class VirtualClock:
    """A clock whose time only moves when something sleeps on it or calls :meth:`advance`.

    Sleeping jumps time straight to the deadline (and yields once to the loop), so a paced
    source reads a 10 s clip at full speed while every timestamp it sees is consistent with
    real-time pacing.
    """

    def __init__(self, start_ns: int = 0) -> None:
        """Start the clock at ``start_ns``."""
        self._now_ns = start_ns
        self.slept_ns = 0

    def now_ns(self) -> int:
        """Current virtual time in ns."""
        return self._now_ns

    def advance(self, delta_ns: int) -> None:
        """Move time forward by ``delta_ns`` (never backward)."""
        if delta_ns < 0:
            raise ValueError("a clock never goes backward")
        self._now_ns += delta_ns

    async def sleep_until(self, deadline_ns: int) -> None:
        """Jump to the deadline if it is in the future, then yield to the loop once."""
        if deadline_ns > self._now_ns:
            self.slept_ns += deadline_ns - self._now_ns
            self._now_ns = deadline_ns
        await asyncio.sleep(0)
