"""Benchmark: how late do events come for a WebRTC publisher, and how many publishers fit?

Question: with publishers sending a real clip over WebRTC on loopback (``talkscope publish``,
each a separate process, as a browser would be), how long from a frame's media timestamp on the
sender's clock to the arrival of the event about it at a WebSocket client (p50/p95/p99); and how
many concurrent publishers (one face each) does this machine keep in real time with no video
dropped and no track restarted?

Method: the server runs in-process, assembled by ``talkscope serve``'s own
:func:`pipelines.serve.assemble` (event hub, WHIP endpoint, live engine); a
:class:`~clients.talkscope_client.TalkscopeClient` on loopback stamps each ``speaker`` and
``sync`` event's arrival with ``time.time_ns()``. The media timestamp of an
event is its ``pts_ns`` plus the stream's base on the sender's clock (RTCP sender reports; for
aiortc the send time of the frame, which is when the publisher played it: capture time for a
file). Sender and server share this machine's clock, so the difference is the latency: network,
jitter buffer, decode, faces, models and the WebSocket hop. The publishers' VP8 encoding runs on
the same two cores as the engine, so the count is of publishers *and* engine on one machine.

Conclusion (2-core VM, no GPU, this commit): see the table the script prints and
``benchmarks/results/webrtc.json``; the numbers are quoted in the README's "WebRTC" section.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import environment, write_report  # noqa: E402
from clients.talkscope_client import TalkscopeClient  # noqa: E402
from engine.sources.webrtc import NTP_TO_UNIX_NS, WebRtcSource  # noqa: E402
from pipelines.live import Percentiles  # noqa: E402
from pipelines.serve import ServeOptions, assemble  # noqa: E402

CLIP = REPO.parent / "shared" / "data" / "av" / "mimictalk" / "German_20s.mp4"


def percentiles(values: list[float]) -> dict[str, float | None]:
    """``p50``, ``p95``, ``p99`` in ms, as the engine's ``stats`` events give them."""
    summary = Percentiles(size=max(1, len(values)))
    for value in values:
        summary.add(value)
    return {name.removesuffix("_ms"): value for name, value in summary.summary().items()}


async def run(publishers: int, seconds: float) -> dict[str, Any]:
    """``publishers`` processes publish the clip for ``seconds``; latencies and drops."""
    served = assemble(ServeOptions([], port=0, max_publishers=publishers))
    engine, server = served.engine, served.server
    arrivals: list[tuple[int, dict[str, Any]]] = []
    async with server:
        engine_task = asyncio.create_task(engine.run(keep_running=True))
        client_task = asyncio.create_task(collect(server.url, arrivals))
        base = f"http://127.0.0.1:{server.port}/whip"
        processes = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "engine",
                "publish",
                str(CLIP),
                "--to",
                f"{base}?stream=p{index}",
                "--seconds",
                str(seconds),
                cwd=REPO,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            for index in range(publishers)
        ]
        await asyncio.gather(*(process.wait() for process in processes))
        await asyncio.sleep(1.0)
        stats = {stream.stream_id: stream.stats() for stream in engine.streams}
        resets = {stream.stream_id: stream.counters["track_resets"] for stream in engine.streams}
        await served.whip.aclose()
        for task in (client_task, engine_task):
            task.cancel()
        await asyncio.gather(client_task, engine_task, return_exceptions=True)
    sources = {
        stream.stream_id: stream.source
        for stream in engine.streams
        if isinstance(stream.source, WebRtcSource)
    }
    latencies: list[float] = []
    by_type: dict[str, list[float]] = {"speaker": [], "sync": []}
    for arrival_ns, event in arrivals:
        source = sources.get(event["stream_id"])
        if source is None or source.base_ns is None or event["pts_ns"] is None:
            continue
        media_unix_ns = source.base_ns + event["pts_ns"] - NTP_TO_UNIX_NS
        latencies.append((arrival_ns - media_unix_ns) / 1e6)
        by_type[event["type"]].append(latencies[-1])
    drops = sum(s["drops"]["video_frames"] for s in stats.values())
    return {
        "publishers": publishers,
        "streams_seen": len(sources),
        "events": len(latencies),
        "latency_ms": percentiles(latencies),
        "latency_ms_by_type": {name: percentiles(v) for name, v in by_type.items()},
        "engine_end_to_end_ms": {k: s["latency_ms"] for k, s in stats.items()},
        "video_dropped": drops,
        "track_resets": sum(resets.values()),
        "real_time": len(sources) == publishers and drops == 0 and sum(resets.values()) == 0,
    }


async def collect(url: str, arrivals: list[tuple[int, dict[str, Any]]]) -> None:
    async with TalkscopeClient(url) as client:
        async for event in client.events(types=["speaker", "sync"]):
            arrivals.append((time.time_ns(), event))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=18.0, help="media per publisher")
    parser.add_argument("--max-publishers", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/webrtc.json")
    args = parser.parse_args()
    rows = []
    for count in range(1, args.max_publishers + 1):
        row = asyncio.run(run(count, args.seconds))
        rows.append(row)
        lat = row["latency_ms"]
        print(
            f"{count} publisher(s): capture->event p50/p95/p99 "
            f"{lat['p50']}/{lat['p95']}/{lat['p99']} ms, video dropped {row['video_dropped']}, "
            f"track resets {row['track_resets']}, real time: {row['real_time']}; "
            f"speaker p50 {row['latency_ms_by_type']['speaker']['p50']} ms, "
            f"sync p50 {row['latency_ms_by_type']['sync']['p50']} ms; engine (arrival->event) "
            f"{row['engine_end_to_end_ms']}",
            flush=True,
        )
    kept = max((r["publishers"] for r in rows if r["real_time"]), default=0)
    print("\n| publishers | p50 ms | p95 ms | p99 ms | video dropped | real time |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        lat = row["latency_ms"]
        print(
            f"| {row['publishers']} | {lat['p50']} | {lat['p95']} | {lat['p99']} "
            f"| {row['video_dropped']} | {row['real_time']} |"
        )
    print(f"\nconcurrent publishers kept in real time: {kept}")
    report = {
        "environment": environment(["aiortc", "av", "onnxruntime", "numpy", "websockets"]),
        "clip": CLIP.name,
        "seconds": args.seconds,
        "runs": rows,
        "max_real_time_publishers": kept,
    }
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
