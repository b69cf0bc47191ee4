"""The live engine end to end: ``talkscope serve`` as a real process, real clips, a real client."""

from __future__ import annotations

import asyncio
import re
import statistics
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from clients.talkscope_client import TalkscopeClient, TokenRefused
from engine.analysis.speaker import SpeakerConfig, SpeakerSelector
from pipelines.scenes import Scene, build_scene
from tests.conftest import REPO, clip, free_udp_port, remux, scaled, serve_udp

GERMAN = "mimictalk/German_20s.mp4"
ANCHOR = "dfrf/cnn2_25fps.mp4"


@asynccontextmanager
async def serving(*args: str) -> AsyncIterator[str]:
    """``talkscope serve --port 0 ARGS``: yields the events URL; SIGINT at the end."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "engine",
        "serve",
        "--port",
        "0",
        *args,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), scaled(60))
        match = re.search(r"(ws://\S+)", line.decode())
        assert match, f"no URL in {line!r}"
        yield match.group(1)
    finally:
        if process.returncode is None:
            process.send_signal(2)
            try:
                await asyncio.wait_for(process.wait(), scaled(20))
            except TimeoutError:
                process.kill()
                await process.wait()


async def collect(
    url: str, *, token: str | None = None, until_ended: int = 1
) -> list[dict[str, Any]]:
    """Every event until ``until_ended`` streams have ended (or errored)."""
    events: list[dict[str, Any]] = []
    ended = 0
    async with TalkscopeClient(url, token) as client:
        async for event in client.events():
            events.append(event)
            if event["type"] == "stream" and event["state"] in ("ended", "error"):
                ended += 1
                if ended >= until_ended:
                    break
    return events


# --- the speaker state machine (pure) ------------------------------------------------------------


def test_speaker_selector_holds_against_a_one_update_blip() -> None:
    selector = SpeakerSelector(SpeakerConfig(switch_updates=2))
    assert selector.update(0.9, {1: 0.9, 2: 0.1}).track_id == 1
    assert selector.update(0.9, {1: 0.4, 2: 0.9}).track_id == 1  # one update: no flicker
    assert selector.update(0.9, {1: 0.4, 2: 0.9}).track_id == 2  # two in a row: switch
    decision = selector.update(0.1, {1: 0.4, 2: 0.9})
    decision = selector.update(0.1, {1: 0.4, 2: 0.9})
    assert (decision.state, decision.track_id) == ("silent", None)


def test_scene_speaker_share_counts_frames_after_each_switch_settles() -> None:
    tiles = [[0, 0, 100, 100], [100, 0, 200, 100]]
    scene = Scene(Path("x.mp4"), tiles, [(0, 2, 0), (2, 4, 1)], 4.0)
    left, right = [10, 10, 90, 90], [110, 10, 190, 90]

    def speaker(t_s: float, box: list[int] | None) -> dict[str, Any]:
        track = None if box is None else 1
        return {"type": "speaker", "pts_ns": round(t_s * 1e9), "track_id": track, "box": box}

    always_right = [speaker(0.0, left), speaker(2.0, right)]
    assert scene.speaker_right_share(always_right) == 1.0
    # 37 frames counted per turn (from 0.52 s); a switch named at 3.0 s misses 2.52..2.96 s
    one_second_late = [speaker(0.0, left), speaker(3.0, right)]
    assert scene.speaker_right_share(one_second_late) == pytest.approx(1 - 12 / 74)
    assert scene.speaker_right_share([speaker(0.0, None)]) == 0.0


def test_speech_without_a_matching_face_is_an_offscreen_voice() -> None:
    selector = SpeakerSelector(SpeakerConfig(offscreen_updates=3))
    states = [selector.update(0.95, {1: 0.05}).state for _ in range(4)]
    assert states[-1] == "offscreen"
    assert selector.update(0.95, {1: 0.9}).state == "speaking"


# --- real processes --------------------------------------------------------------------------


@pytest.mark.slow
async def test_sync_events_of_a_clip_with_audio_delayed_120_ms(tmp_path: Path) -> None:
    source = clip(GERMAN)
    delayed = remux(source, source, tmp_path / "delayed.mp4", audio_delay_s=0.12)
    async with serving("--source", f"cam={delayed}", "--exit-when-done") as url:
        events = await asyncio.wait_for(collect(url), scaled(120))
    syncs = [e for e in events if e["type"] == "sync" and e["state"] == "ok"]
    assert len(syncs) > 50  # five a second over most of the 20 s
    assert all(e["stream_id"] == "cam" and e["window_s"] == 2.0 for e in syncs)
    median_ms = statistics.median(e["offset_ms"] for e in syncs)
    assert -160 <= median_ms <= -80, median_ms  # -120 ms within a frame
    speakers = [e for e in events if e["type"] == "speaker" and e["state"] == "speaking"]
    assert len(speakers) > 0.8 * len([e for e in events if e["type"] == "speaker"])
    starts = [e for e in events if e["type"] == "track_start"]
    assert starts and len(starts[0]["box"]) == 4


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="issue 6 target: >= 90% of frames; measured about 75%: both faces move their lips, "
    "Light-ASD scores both as talking, and SyncNet-lite's lip match over the last 1 s (issue 5's "
    "model) picks the sounding face on about 83% of windows and switches about 0.7 s after the "
    "sound does (in media time)",
)
async def test_two_face_scene_active_speaker_is_right_on_90_percent(tmp_path: Path) -> None:
    scene = build_scene([clip(GERMAN), clip(ANCHOR)], tmp_path / "scene.mp4", seconds=18.0)
    async with serving("--source", f"scene={scene.path}", "--exit-when-done") as url:
        events = await asyncio.wait_for(collect(url), scaled(120))
    share = scene.speaker_right_share(events)
    assert share >= 0.9, f"speaker right on {share:.1%} of frames"


async def test_a_token_is_required_when_set(tmp_path: Path) -> None:
    source = clip(GERMAN)
    async with serving("--source", str(source), "--token", "s3cret") as url:
        with pytest.raises(TokenRefused):
            async with TalkscopeClient(url) as client:
                await client.events().__anext__()
        async with TalkscopeClient(url, "s3cret") as client:
            assert client.hello is not None and client.hello["streams"] == ["s0"]


@pytest.mark.slow
async def test_a_missing_source_is_an_error_event_and_the_other_stream_runs(
    tmp_path: Path,
) -> None:
    good = clip("grid_lipnet/swiz3n.mpg")
    async with serving(
        "--source",
        f"bad={tmp_path / 'missing.mp4'}",
        "--source",
        f"good={good}",
        "--exit-when-done",
    ) as url:
        events = await asyncio.wait_for(collect(url, until_ended=2), scaled(60))
    states = {(e["stream_id"], e["state"]) for e in events if e["type"] == "stream"}
    assert ("bad", "error") in states
    assert ("good", "ended") in states
    assert any(e["type"] == "track_start" and e["stream_id"] == "good" for e in events)


async def events_until_back(url: str, seen: list[dict[str, Any]]) -> None:
    """Collect events until the stream came back after an outage and gave a face event again."""
    outage = back = False
    async with TalkscopeClient(url) as client:
        async for event in client.events():
            seen.append(event)
            state = event.get("state") if event["type"] == "stream" else None
            if state in ("stalled", "reconnecting"):
                outage = True
            elif state == "started" and outage:
                back = True
            elif back and event["type"] in ("track_start", "sync", "speaker"):
                return


@pytest.mark.slow
async def test_a_udp_source_that_disappears_and_comes_back() -> None:
    """A live UDP stream stops for 4 s and resumes: stalled, reconnected, faces again."""
    port = free_udp_port()
    stop = threading.Event()
    source = clip(GERMAN)
    seen: list[dict[str, Any]] = []
    async with serving("--source", f"cam=udp://127.0.0.1:{port}") as url:
        listener = asyncio.create_task(events_until_back(url, seen))
        senders: list[asyncio.Task[None]] = []
        try:
            await asyncio.to_thread(serve_udp, source, port, 5.0, stop)
            await asyncio.sleep(4.0)  # the sender is gone
            senders.append(
                asyncio.create_task(asyncio.to_thread(serve_udp, source, port, 12.0, stop))
            )
            await asyncio.wait_for(asyncio.shield(listener), scaled(40))
        finally:
            stop.set()
            listener.cancel()
            await asyncio.gather(listener, *senders, return_exceptions=True)
    states = [e["state"] for e in seen if e["type"] == "stream"]
    assert states[0] == "started"
    assert "stalled" in states or "reconnecting" in states
    assert states.count("started") >= 2, states
    assert "error" not in states and "ended" not in states
    outage = min(i for i, e in enumerate(seen) if e.get("state") in ("stalled", "reconnecting"))
    assert any(e["type"] == "track_start" for e in seen[:outage])  # a face before the outage
    after = [e for e in seen[outage:] if e["type"] in ("track_start", "sync", "speaker")]
    assert after and all(e["stream_id"] == "cam" for e in after)
