"""``talkscope serve``: the live engine and the WebSocket event server in one process.

Sources run through one :class:`~pipelines.live.LiveEngine` (shared batchers); every event goes
to an :class:`~engine.server.EventHub` that fans it out to the clients of an
:class:`~engine.server.EventServer` (``ws://HOST:PORT/events``, ``/schema.json``, ``/health``).
WebRTC publishers join on the same port by WHIP (``POST /whip``, :mod:`engine.whip`): each
becomes one more stream of the same engine. The page at ``/`` publishes a browser's camera and
microphone that way and draws the events. SIGINT and SIGTERM shut everything down cleanly:
publishers' sessions end, streams stop, clients are closed with 1001.
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
from engine.sources.webrtc import WebRtcSource
from engine.whip import WHIP_PATH, WhipEndpoint
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
    whip: bool = True
    max_publishers: int = 8
    ice_servers: Sequence[str] = ()


@dataclass(frozen=True)
class Served:
    """The parts ``talkscope serve`` runs, wired together (nothing started yet)."""

    engine: LiveEngine
    whip: WhipEndpoint
    server: EventServer


def assemble(options: ServeOptions) -> Served:
    """Hub, engine, WHIP endpoint and event server as ``talkscope serve`` wires them."""
    hub = EventHub()
    for index, text in enumerate(options.sources):
        hub.add_stream(split_source(text, index)[0])
    engine = LiveEngine(options.sources, hub.publish, options.config)

    def on_publish(source: WebRtcSource) -> None:
        hub.add_stream(source.stream_id)
        engine.add_source(source)

    whip = WhipEndpoint(
        on_publish, max_publishers=options.max_publishers, ice_servers=options.ice_servers
    )
    handlers = {WHIP_PATH: whip.handle} if options.whip else {}
    server = EventServer(
        hub, options.host, options.port, token=options.token, http_handlers=handlers
    )
    return Served(engine, whip, server)


async def serve(options: ServeOptions, out: TextIO = sys.stdout) -> int:
    """Run until a signal arrives (or, with ``exit_when_done``, until every source has ended)."""
    served = assemble(options)
    engine, whip, server = served.engine, served.whip, served.server
    keep_running = options.whip and not (options.exit_when_done and options.sources)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    async with server:
        _announce(options, server, out)
        engine_task = asyncio.create_task(engine.run(keep_running=keep_running), name="engine")
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
            await whip.aclose()
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


def _announce(options: ServeOptions, server: EventServer, out: TextIO) -> None:
    host = f"[{options.host}]" if ":" in options.host else options.host
    base = f"http://{host}:{server.port}"
    lines = [
        f"talkscope: serving {len(options.sources)} stream(s) at {server.url}",
        f"talkscope: open {base}/ in a browser"
        + (" to publish a camera (WebRTC) and see who speaks" if options.whip else ""),
        f"talkscope: schema at {base}/schema.json; watch with: talkscope watch {server.url}",
    ]
    if options.whip:
        lines.append(f"talkscope: WebRTC publishers (WHIP) at {base}{WHIP_PATH}")
    for line in lines:
        print(line, file=out, flush=True)
