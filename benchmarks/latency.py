"""Benchmark: how fast does the live engine answer, and how many real-time streams does it keep?

Question: on this machine, with real clips played in real time (paced by their timestamps), what
is the processing latency (an event's wall time minus the arrival of the newest frame it used)
per stage and end to end; how long after a true change of speaker does the engine name the new
one; how long after a face appears does its first sync estimate come; and how many concurrent
25 fps streams (one face each, then two) does it keep in real time with no video dropped?

Method: the engine runs in-process (:class:`pipelines.live.LiveEngine`), exactly as
``talkscope serve`` runs it, with a publisher that stamps each event's arrival. Scenes:
``German_20s`` (one face, test split) and a two-face scene built by :mod:`pipelines.scenes`
(German_20s and cnn2_25fps side by side, the sound alternating every 3 s). Switch latency: for
each true switch, the wall time from the switch frame's due time to the first ``speaker`` event
naming the new tile (none within the turn counts as a miss); speaker accuracy: the share of
frames, from 0.5 s after each switch, whose latest ``speaker`` event names the sounding tile (the
measure of ``tests/test_live.py``). "Real time" for N streams: in each of ``--runs`` runs of 15 s,
each in a fresh process, no video frame dropped (late frames are dropped, counted) and no track
restarted.

The processing latency counts from the newest frame an event *used*: a face crop's box is
smoothed over 6 frames ahead of it (the smoothing the sync model was trained with), so a crop's
newest frame is 6 frames past its own. The media an event describes is older than that by the
look-ahead (crop smoothing 6 frames, encoder context 6 frames: about 0.5 s in all); the switch
latency, measured from the true switch on the wall clock, includes everything.

Conclusion (2-core VM, no GPU, this commit): see the table the script prints and
``benchmarks/results/latency.json``; the numbers are quoted in the README's "Live" section.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import environment, write_report  # noqa: E402
from pipelines.live import LiveConfig, LiveEngine  # noqa: E402
from pipelines.scenes import Scene, build_scene  # noqa: E402

AV = REPO.parent / "shared" / "data" / "av"
ONE_FACE = AV / "mimictalk" / "German_20s.mp4"
SECOND = AV / "dfrf" / "cnn2_25fps.mp4"


async def run_streams(sources: list[str], seconds: float) -> tuple[list[dict[str, Any]], Any]:
    """Run the engine on ``sources`` for ``seconds``; every event with its arrival time."""
    events: list[dict[str, Any]] = []

    def publish(event: dict[str, Any]) -> None:
        event["_arrival_ns"] = time.monotonic_ns()
        events.append(event)

    engine = LiveEngine(sources, publish, LiveConfig())
    start = time.monotonic_ns()
    try:
        await asyncio.wait_for(engine.run(), seconds)
    except TimeoutError:
        pass
    for event in events:
        event["_t_s"] = (event["_arrival_ns"] - start) / 1e9
    return events, engine


def summarise(engine: LiveEngine) -> dict[str, Any]:
    """Per-stream latencies (ms percentiles) and drops."""
    streams = []
    for stream in engine.streams:
        stats = stream.stats()
        streams.append(
            {
                "stream": stream.stream_id,
                "stages": stats["stages"],
                "end_to_end": stats["latency_ms"],
                "drops": stats["drops"],
                "video_frames": stream.counters["video_frames"],
            }
        )
    return {"streams": streams}


def switch_latencies(
    events: list[dict[str, Any]], scene: Scene, engine: LiveEngine
) -> tuple[list[float], int]:
    """Seconds from each true switch to the first speaker event naming the new tile."""
    speakers = [e for e in events if e["type"] == "speaker" and e["box"] is not None]
    stream = engine.streams[0]
    first_video = (stream.first_arrival_ns or 0) - (stream.origin_ns or 0)
    latencies, misses = [], 0
    for start, end, tile in scene.turns[1:]:
        box = scene.tiles[tile]
        due_ns = first_video + round(start * 1e9)
        hits = [
            e
            for e in speakers
            if start * 1e9 <= e["pts_ns"] < end * 1e9
            and box[0] <= (e["box"][0] + e["box"][2]) / 2 < box[2]
        ]
        if hits:
            latencies.append((hits[0]["_arrival_ns"] - due_ns) / 1e9)
        else:
            misses += 1
    return latencies, misses


def first_sync_delays(events: list[dict[str, Any]]) -> list[float]:
    """Seconds from each track's start event to its first ``ok`` sync event."""
    delays = []
    for start in (e for e in events if e["type"] == "track_start"):
        syncs = [
            e
            for e in events
            if e["type"] == "sync"
            and e["state"] == "ok"
            and e["stream_id"] == start["stream_id"]
            and e["track_id"] == start["track_id"]
        ]
        if syncs:
            delays.append(syncs[0]["_arrival_ns"] / 1e9 - start["_arrival_ns"] / 1e9)
    return delays


def one_level(source: str, streams: int, seconds: float) -> dict[str, Any]:
    """One run of ``streams`` copies of ``source`` (in a fresh process: see :func:`concurrency`)."""
    _, engine = asyncio.run(run_streams([f"c{i}={source}" for i in range(streams)], seconds))
    return {
        "video_dropped": sum(s.stats()["drops"]["video_frames"] for s in engine.streams),
        "track_resets": sum(s.counters["track_resets"] for s in engine.streams),
        "p95_ms": max((s.stats()["latency_ms"]["p95"] or 0.0) for s in engine.streams),
    }


def concurrency(source: Path, max_streams: int, seconds: float, runs: int) -> list[dict[str, Any]]:
    """Streams 1..max_streams of ``source`` at once; stop after the first that falls behind.

    Each run is a fresh process, as ``talkscope serve`` is: a run does not inherit the heap or
    the caches of the runs before it. A level counts as real time only when every one of its
    ``runs`` runs dropped no video and restarted no track.
    """
    rows = []
    spawn = multiprocessing.get_context("spawn")
    for n in range(1, max_streams + 1):
        results = []
        for _ in range(runs):
            with spawn.Pool(1) as pool:
                results.append(pool.apply(one_level, (str(source), n, seconds)))
        drops = [r["video_dropped"] for r in results]
        resets = [r["track_resets"] for r in results]
        ok = not any(drops) and not any(resets)
        p95 = max(r["p95_ms"] for r in results)
        rows.append(
            {
                "streams": n,
                "real_time": ok,
                "runs": results,
                "video_dropped": drops,
                "track_resets": resets,
                "p95_ms": p95,
            }
        )
        print(
            f"  {source.name}: {n} stream(s), {runs} runs: dropped {drops}, resets {resets}, "
            f"p95 {p95:.0f} ms -> {'real time' if ok else 'falls behind'}",
            flush=True,
        )
        if not ok:
            break
    return rows


def main() -> None:
    """Run the benchmark; print the table; write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=18.0, help="length of each run")
    parser.add_argument("--max-streams", type=int, default=6)
    parser.add_argument("--runs", type=int, default=2, help="runs per stream count")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/latency.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        scene = build_scene([ONE_FACE, SECOND], Path(tmp) / "scene.mp4", seconds=args.seconds)
        print("one stream, one face (German_20s):", flush=True)
        events, engine = asyncio.run(run_streams([f"one={ONE_FACE}"], args.seconds))
        one = summarise(engine) | {"first_sync_s": first_sync_delays(events)}
        print("one stream, two-face scene:", flush=True)
        events, engine = asyncio.run(run_streams([f"scene={scene.path}"], args.seconds + 1))
        switches, misses = switch_latencies(events, scene, engine)
        two = summarise(engine) | {
            "switch_latency_s": switches,
            "switch_misses": misses,
            "speaker_right_share": scene.speaker_right_share(events),
        }
        print("concurrent streams:", flush=True)
        one_face_rows = concurrency(ONE_FACE, args.max_streams, 15.0, args.runs)
        two_face_rows = concurrency(scene.path, args.max_streams, 15.0, args.runs)
    e2e = one["streams"][0]["end_to_end"]
    print("\n| measure | value |\n|---|---|")
    print(
        f"| one stream: end-to-end p50 / p95 / p99 | {e2e['p50']} / {e2e['p95']} / "
        f"{e2e['p99']} ms |"
    )
    for name, stage in one["streams"][0]["stages"].items():
        print(f"| one stream: {name} p50 / p95 | {stage['p50_ms']} / {stage['p95_ms']} ms |")
    median_switch = statistics.median(switches) if switches else None
    print(
        f"| speaker switch latency, median (n={len(switches)}, misses {misses}) | "
        f"{median_switch if median_switch is None else round(median_switch, 2)} s |"
    )
    print(
        f"| two-face scene: speaker right on (frames from 0.5 s after a switch) | "
        f"{100 * two['speaker_right_share']:.1f}% |"
    )
    first = one["first_sync_s"]
    print(
        f"| first sync estimate after a face appears | {round(first[0], 2) if first else None} s |"
    )
    kept1 = max((r["streams"] for r in one_face_rows if r["real_time"]), default=0)
    kept2 = max((r["streams"] for r in two_face_rows if r["real_time"]), default=0)
    print(f"| concurrent real-time streams, 1 face each | {kept1} |")
    print(f"| concurrent real-time streams, 2 faces each | {kept2} |")
    report = {
        "question": __doc__.splitlines()[0],
        "environment": environment(
            ["onnxruntime", "numpy", "av", "ai-edge-litert", "websockets"],
            provider="CPUExecutionProvider",
        ),
        "one_face": one,
        "two_face_scene": two,
        "speaker_switch_median_s": median_switch,
        "concurrency_one_face": one_face_rows,
        "concurrency_two_faces": two_face_rows,
        "max_real_time_streams": {"one_face": kept1, "two_faces": kept2},
    }
    write_report(report, args.out)


if __name__ == "__main__":
    main()
