"""Stages and pipelines: async, composable, cancellable, with an explicit shutdown.

A stage is an async-iterator transform (:class:`Stage`) or a per-item processor
(:class:`Processor`, wrapped by :class:`ProcessorStage`). A :class:`Pipeline` runs a source and a
chain of stages, each in its own task, joined by bounded :class:`~engine.core.channel.Channel` s,
inside one :class:`asyncio.TaskGroup`.

There are no in-band lifecycle frames: the end of a stream is the end of iteration, and shutdown
is a method call, ``aclose(drain=True)`` (stop intake, let what is in flight reach the output, with
a deadline) or ``aclose(drain=False)`` (cancel everything, discard what is queued, counted).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar

from engine.core.channel import Channel, ChannelStats, FullPolicy
from engine.core.errors import ChannelClosed, StageError

In = TypeVar("In")
Out = TypeVar("Out")
In_contra = TypeVar("In_contra", contravariant=True)
Out_co = TypeVar("Out_co", covariant=True)


class Stage(Protocol[In_contra, Out_co]):
    """An async-iterator transform: consumes ``src`` and yields outputs at its own pace."""

    name: str

    def run(self, src: AsyncIterator[In_contra]) -> AsyncIterator[Out_co]:
        """Yield outputs for the inputs read from ``src``; end when ``src`` ends."""
        ...


class Processor(Protocol[In_contra, Out_co]):
    """One input in, zero or one output out."""

    async def process(self, item: In_contra) -> Out_co | None:
        """Handle one item; return None to emit nothing."""
        ...


class ProcessorStage(Generic[In, Out]):
    """Adapts a :class:`Processor` (or a plain async function) to the :class:`Stage` shape."""

    def __init__(
        self, process: Callable[[In], Awaitable[Out | None]], *, name: str = "processor"
    ) -> None:
        """Wrap ``process`` (an async callable, e.g. ``processor.process``)."""
        self._process = process
        self.name = name

    async def run(self, src: AsyncIterator[In]) -> AsyncIterator[Out]:
        """Call the processor on every input and yield what it returns, Nones left out."""
        async for item in src:
            out = await self._process(item)
            if out is not None:
                yield out


@dataclass(frozen=True)
class LinkStats:
    """The counters of the channel that feeds one stage (or the output)."""

    into: str
    stats: ChannelStats


class Pipeline(Generic[Out]):
    """A source and a chain of stages, each in its own task, linked by bounded channels.

    Use it as an async context manager and read :meth:`outputs`::

        async with Pipeline(source, [stage_a, stage_b], capacity=8) as pipe:
            async for out in pipe.outputs():
                ...

    Reading :meth:`outputs` to its end lets every item through. Leaving the ``async with``
    block cancels whatever still runs and discards what is queued (counted); to drain instead,
    call ``aclose(drain=True)`` while a reader is still consuming the outputs. A stage that
    raises stops the whole
    pipeline and the error surfaces from :meth:`outputs` (or from ``aclose``) as
    :class:`StageError`.

    Args:
        source: where the inputs come from.
        stages: the transforms, in order; the output type is the last one's.
        capacity: size of each link channel.
        full: full-policy of each link channel.
        name: shown in errors and stats.
    """

    def __init__(
        self,
        source: AsyncIterable[Any],
        stages: Sequence[Stage[Any, Any]],
        *,
        capacity: int = 8,
        full: FullPolicy = FullPolicy.WAIT,
        name: str = "pipeline",
    ) -> None:
        """See the class docstring."""
        self.name = name
        self._source = source
        self._stages = list(stages)
        names = ["source", *(s.name for s in self._stages)]
        self._links: list[Channel[Any]] = [
            Channel(capacity, full, name=f"{name}:{n}->") for n in names
        ]
        self._group: asyncio.TaskGroup | None = None
        self._runner_task: asyncio.Task[None] | None = None
        self._intake_task: asyncio.Task[None] | None = None
        self._error: BaseException | None = None
        self._closed = False

    @property
    def stats(self) -> list[LinkStats]:
        """Counters of every link, source first."""
        return [LinkStats(into=ch.name, stats=ch.stats) for ch in self._links]

    async def __aenter__(self) -> Pipeline[Out]:
        """Start the tasks."""
        self._runner_task = asyncio.create_task(self._run(), name=f"{self.name}:runner")
        await asyncio.sleep(0)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Cancel whatever still runs and discard what is queued (see :meth:`aclose`)."""
        await self.aclose(drain=False)

    async def _run(self) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                self._intake_task = group.create_task(self._intake(), name=f"{self.name}:intake")
                for index, stage in enumerate(self._stages):
                    group.create_task(self._pump(index, stage), name=f"{self.name}:{stage.name}")
        except BaseExceptionGroup as group_error:
            self._error = first_real_error(group_error)
            for link in self._links:
                link.discard()

    async def _intake(self) -> None:
        first = self._links[0]
        try:
            async for item in self._source:
                await first.send(item)
        except asyncio.CancelledError:
            if first.closed:  # aclose(drain=True) stopped the intake on purpose
                return
            raise
        except ChannelClosed:  # the pipeline is shutting down: stop quietly
            return
        except Exception as error:
            raise StageError(f"{self.name}: source failed: {error}") from error
        finally:
            first.close()
            aclose = getattr(self._source, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    async def _pump(self, index: int, stage: Stage[Any, Any]) -> None:
        inbox, outbox = self._links[index], self._links[index + 1]
        outputs = stage.run(aiter(inbox))
        try:
            async for item in outputs:
                await outbox.send(item)
        except ChannelClosed:  # the pipeline is shutting down: stop quietly
            return
        except Exception as error:
            raise StageError(f"{self.name}: stage {stage.name!r} failed: {error}") from error
        finally:
            outbox.close()
            aclose = getattr(outputs, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    async def outputs(self) -> AsyncIterator[Out]:
        """Yield what the last stage emits, until the pipeline ends.

        Raises:
            StageError: a stage (or the source) failed.
        """
        async for item in self._links[-1]:
            yield item
        if self._runner_task is not None:
            await asyncio.shield(self._runner_task)
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        """Raise the failure once: whoever sees it first (outputs or aclose) reports it."""
        error, self._error = self._error, None
        if error is not None:
            if isinstance(error, StageError):
                raise error
            raise StageError(f"{self.name}: {error}") from error

    async def aclose(self, *, drain: bool = True, timeout_s: float = 5.0) -> None:
        """Stop the pipeline. Idempotent.

        Args:
            drain: True stops the intake and lets queued items flow to the output (which must
                still be read, or the drain waits); False cancels every task at once and
                discards what is queued.
            timeout_s: deadline for the drain; past it the pipeline is cancelled instead.

        Raises:
            StageError: a stage had failed and :meth:`outputs` has not raised it yet.
        """
        if self._closed or self._runner_task is None:
            return
        self._closed = True
        if drain:
            self._links[0].close()
            if self._intake_task is not None:
                self._intake_task.cancel()
            done, _ = await asyncio.wait({self._runner_task}, timeout=timeout_s)
            if done:
                self._raise_if_failed()
                return
        for link in self._links:
            link.discard()
        self._runner_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._runner_task
        self._raise_if_failed()


def first_real_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first error of a task group that is not a cancellation (the group if none is)."""
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            return first_real_error(error)
        if not isinstance(error, asyncio.CancelledError):
            return error
    return group


async def run_stage(stage: Stage[In, Out], inputs: Sequence[In]) -> list[Out]:
    """Run one stage over a list of inputs and collect its outputs (for tests and scripts)."""

    async def feed() -> AsyncIterator[In]:
        for item in inputs:
            yield item

    return [out async for out in stage.run(feed())]
