"""``talkscope serve``: the live engine and the WebSocket event server in one process.

Sources run through one :class:`~pipelines.live.LiveEngine` (shared batchers); every event goes
to an :class:`~engine.server.EventHub` that fans it out to the clients of an
:class:`~engine.server.EventServer` (``ws://HOST:PORT/events``, ``/schema.json``, ``/health``).
SIGINT and SIGTERM shut both down cleanly: streams stop, clients are closed with 1001.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

from engine.server import EventHub, EventServer
from pipelines.live import LiveConfig, LiveEngine, split_source


@dataclass(frozen=True)
class ServeOptions:
    """What ``talkscope serve`` was asked to do."""

    sources: Sequence[str]
    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None
    exit_when_done: bool = False
    config: LiveConfig = LiveConfig()


async def serve(options: ServeOptions, out: TextIO = sys.stdout) -> int:
    """Run until a signal arrives (or, with ``exit_when_done``, until every source has ended)."""
    hub = EventHub()
    for index, text in enumerate(options.sources):
        hub.add_stream(split_source(text, index)[0])
    engine = LiveEngine(options.sources, hub.publish, options.config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    async with EventServer(hub, options.host, options.port, token=options.token) as server:
        print(
            f"talkscope: serving {len(options.sources)} stream(s) at {server.url}",
            file=out,
            flush=True,
        )
        print(
            f"talkscope: schema at http://{options.host}:{server.port}/schema.json; "
            f"watch with: talkscope watch {server.url}",
            file=out,
            flush=True,
        )
        engine_task = asyncio.create_task(engine.run(), name="live-engine")
        stop_task = asyncio.create_task(stop.wait(), name="serve-stop")
        try:
            done, _ = await asyncio.wait(
                {engine_task, stop_task}, return_when=asyncio.FIRST_COMPLETED
            )
            if engine_task in done:
                engine_task.result()  # surface a failure of the engine itself
                if not options.exit_when_done:
                    await stop_task
        finally:
            for task in (engine_task, stop_task):
                task.cancel()
            for task in (engine_task, stop_task):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)
    print("talkscope: stopped", file=out, flush=True)
    return 0
