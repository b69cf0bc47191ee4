"""WebRTC ingest: WHIP on the event server's port, real aiortc peers on loopback, real clips.

In-process tests run a real :class:`EventServer` with the WHIP endpoint and a real aiortc
publisher (``pipelines.publish``); the slow ones run ``talkscope serve`` and ``talkscope
publish`` as processes. The browser test is in ``test_browser.py``.
"""

from __future__ import annotations

import asyncio
import http
import io
import json
import signal
import statistics
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from engine.core.frame import Frame, FrameKind
from engine.server import EventHub, EventServer
from engine.sources.base import SourceState, SourceStateChange
from engine.sources.webrtc import RtpTimeline, WebRtcSource, ntp_to_ns, unwrap_near
from engine.whip import WhipEndpoint
from pipelines.publish import Publisher, PublishOptions
from tests.conftest import REPO, clip, scaled
from tests.test_live import GERMAN, collect, serving

TOKEN = "s3cret"


# --- the RTP clock (pure) ---------------------------------------------------------------------


def test_ntp_timestamps_become_nanoseconds() -> None:
    assert ntp_to_ns((5 << 32) | (1 << 31)) == 5_500_000_000
    assert ntp_to_ns(1 << 32) == 1_000_000_000


def test_rtp_timestamps_unwrap_to_the_nearest_value() -> None:
    wrap = 1 << 32
    assert unwrap_near(10, wrap + 5) == wrap + 10
    assert unwrap_near(wrap - 10, wrap + 5) == wrap - 10
    assert unwrap_near(1000, 900) == 1000


def test_sender_reports_put_two_tracks_on_one_clock() -> None:
    """Audio and video with unrelated RTP origins land on the sender's clock."""
    audio, video = RtpTimeline(48_000), RtpTimeline(90_000)
    audio.origin, video.origin = 4_000_000_000, 123  # aiortc's pts 0 of each track
    ntp = 100 << 32  # both reports taken at sender time 100 s
    audio.on_sender_report(ntp, (4_000_000_000 + 48_000) % (1 << 32))  # pts 1 s was then
    video.on_sender_report(ntp, 123 + 45_000)  # pts 0.5 s was then
    assert audio.sender_ns(48_000, 0) == 100 * 10**9
    assert video.sender_ns(45_000, 0) == 100 * 10**9
    assert audio.sender_ns(96_000, 0) - video.sender_ns(45_000, 0) == 10**9


def test_a_track_without_reports_is_timed_by_arrival_and_stays_so() -> None:
    timeline = RtpTimeline(90_000)
    assert timeline.sender_ns(0, 7_000) == 7_000
    timeline.freeze()
    timeline.origin = 0
    timeline.on_sender_report(1 << 32, 0)  # too late: a jump now would break the stream
    assert timeline.sender_ns(90_000, 0) == 7_000 + 10**9


# --- WHIP on the event server, in process ----------------------------------------------------


class Ingest:
    """The event server with a WHIP endpoint whose publishers' frames are collected."""

    def __init__(self) -> None:
        self.frames: dict[str, list[Frame]] = {}
        self.states: list[SourceStateChange] = []
        self.sources: list[WebRtcSource] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.endpoint = WhipEndpoint(self._publish, max_publishers=2)

    def _publish(self, source: WebRtcSource) -> None:
        self.sources.append(source)
        source.listeners.append(self.states.append)
        self.tasks.append(asyncio.create_task(self._drain(source)))

    async def _drain(self, source: WebRtcSource) -> None:
        frames = self.frames.setdefault(source.stream_id, [])
        async with source:
            async for frame in source:
                frames.append(frame)


@asynccontextmanager
async def whip_server(token: str | None = TOKEN) -> AsyncIterator[tuple[str, Ingest]]:
    ingest = Ingest()
    handlers = {"/whip": ingest.endpoint.handle}
    async with EventServer(EventHub(), token=token, http_handlers=handlers) as server:
        try:
            yield f"http://127.0.0.1:{server.port}", ingest
        finally:
            await ingest.endpoint.aclose()
            for task in ingest.tasks:
                task.cancel()
            await asyncio.gather(*ingest.tasks, return_exceptions=True)


def http_call(
    method: str, url: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, data=body or None, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return (
                response.status,
                {k.lower(): v for k, v in response.headers.items()},
                response.read(),
            )
    except urllib.error.HTTPError as error:
        return error.code, {k.lower(): v for k, v in error.headers.items()}, error.read()


SDP = {"Content-Type": "application/sdp", "Authorization": f"Bearer {TOKEN}"}


async def test_whip_refuses_bad_requests_with_4xx_and_keeps_serving() -> None:
    async with whip_server() as (base, ingest):
        cases = [
            ("POST", "/whip", b"v=0\r\nm=audio", {"Content-Type": "application/sdp"}, 401),
            ("POST", "/whip", b"v=0\r\n", SDP | {"Authorization": "Bearer nope"}, 401),
            ("POST", "/whip", b"hello", SDP, 400),
            ("POST", "/whip", b"v=0\r\no=- 0 0 IN IP4 0\r\nm=audio x\r\n", SDP, 400),
            ("POST", "/whip", b"\xff\xfe", SDP, 400),
            ("POST", "/whip", b"v=0", SDP | {"Content-Type": "text/plain"}, 415),
            ("POST", "/whip?stream=1bad", b"v=0", SDP, 400),
            ("POST", "/whip", b"x" * 300_000, SDP, 413),
            ("DELETE", "/whip/nobody", b"", SDP, 404),
            ("PATCH", "/whip/nobody", b"a=x", SDP, 405),
            ("GET", "/whip", b"", SDP, 405),
            ("PUT", "/anything", b"x", {}, 405),
        ]
        for method, path, body, headers, status in cases:
            got, reply_headers, text = await asyncio.to_thread(
                http_call, method, base + path, body, headers
            )
            assert got == status, (method, path, got, text)
        got, reply_headers, _ = await asyncio.to_thread(http_call, "OPTIONS", base + "/whip")
        assert got == 204 and reply_headers["accept-post"] == "application/sdp"
        got, _, body = await asyncio.to_thread(
            http_call, "GET", base + "/health", b"", {"Authorization": f"Bearer {TOKEN}"}
        )
        assert got == 200 and json.loads(body)["ok"] is True  # still serving
        assert not ingest.sources


async def test_a_published_clip_arrives_with_audio_and_video_on_one_clock() -> None:
    """A real aiortc publisher: frames arrive, lined up by sender reports; DELETE ends it."""
    async with whip_server() as (base, ingest):
        options = PublishOptions(str(clip(GERMAN)), base + "/whip?stream=cam", TOKEN, seconds=4)
        publisher = Publisher(options, io.StringIO())
        await asyncio.wait_for(publisher.run(), scaled(40))
        assert publisher.stream_id == "cam"
        for _ in range(50):
            if any(s.state is SourceState.ENDED for s in ingest.states):
                break
            await asyncio.sleep(0.1)
        frames = ingest.frames["cam"]
        video = [f.pts_ns for f in frames if f.kind is FrameKind.VIDEO]
        audio = [f for f in frames if f.kind is FrameKind.AUDIO]
        assert len(video) > 60 and sum(f.data.size for f in audio) > 3 * 16000
        assert all(b - a == 40_000_000 for a, b in zip(video, video[1:], strict=False))
        # Both tracks start within 100 ms of each other on the sender's clock (their RTP
        # origins are random; without the sender reports they would be seconds apart).
        assert abs(video[0] - audio[0].pts_ns) < 100_000_000, (video[0], audio[0].pts_ns)
        source = ingest.sources[0]
        assert [s.state for s in ingest.states][-1] is SourceState.ENDED
        assert "ended the session" in ingest.states[-1].detail
        assert source.stats.video_frames == len(video)
        assert "cam" not in ingest.endpoint.sessions


async def test_a_stream_id_in_use_is_a_conflict() -> None:
    async with whip_server(token=None) as (base, ingest):
        options = PublishOptions(str(clip(GERMAN)), base + "/whip?stream=cam", seconds=3)
        first = asyncio.create_task(Publisher(options, io.StringIO()).run())
        for _ in range(100):
            if ingest.sources:
                break
            await asyncio.sleep(0.1)
        with pytest.raises(Exception, match="409"):
            await Publisher(options, io.StringIO()).run()
        await asyncio.wait_for(first, scaled(30))


# --- talkscope serve + talkscope publish, as processes ---------------------------------------


async def publish_process(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "engine",
        "publish",
        *args,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


def whip_url(events_url: str) -> str:
    return events_url.replace("ws://", "http://").replace("/events", "/whip")


async def test_publish_with_a_wrong_token_exits_2_with_a_message() -> None:
    async with serving("--no-demo", "--token", TOKEN) as url:
        process = await publish_process(str(clip(GERMAN)), "--to", whip_url(url), "--token", "x")
        _, err = await asyncio.wait_for(process.communicate(), scaled(60))
    assert process.returncode == 2
    assert b"401" in err and b"Traceback" not in err


@pytest.mark.slow
async def test_publish_gives_the_same_events_as_source(tmp_path: Path) -> None:
    """The same clip as a file source and over WebRTC, in one server: same face, same sync."""
    german = str(clip(GERMAN))
    async with serving("--source", f"file={german}", "--token", TOKEN) as url:
        events_task = asyncio.create_task(collect(url, token=TOKEN, until_ended=2))
        process = await publish_process(
            german, "--to", whip_url(url) + "?stream=rtc", "--token", TOKEN
        )
        await asyncio.wait_for(process.communicate(), scaled(90))
        assert process.returncode == 0
        events = await asyncio.wait_for(events_task, scaled(60))
    by_stream: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        by_stream.setdefault(event["stream_id"], []).append(event)
    medians = {}
    for stream in ("file", "rtc"):
        mine = by_stream[stream]
        assert [e for e in mine if e["type"] == "track_start"], stream
        speaking = [e for e in mine if e["type"] == "speaker" and e["state"] == "speaking"]
        speakers = [e for e in mine if e["type"] == "speaker"]
        assert len(speaking) > 0.7 * len(speakers), stream
        syncs = [e["offset_frames"] for e in mine if e["type"] == "sync" and e["state"] == "ok"]
        assert len(syncs) > 40, stream
        medians[stream] = statistics.median(syncs)
    assert abs(medians["file"] - medians["rtc"]) <= 1, medians
    ends = [e for e in by_stream["rtc"] if e["type"] == "stream" and e["state"] != "started"]
    assert ends[-1]["state"] == "ended", ends


@pytest.mark.slow
async def test_a_publisher_that_vanishes_is_an_error_others_go_on_and_it_comes_back() -> None:
    """Kill -9 a publisher: its stream stalls then errors, the file stream goes on, and the
    same stream id publishing again is a live stream again."""
    german = str(clip(GERMAN))
    async with serving("--source", f"file={german}", "--loop") as url:
        events: list[dict[str, Any]] = []
        watcher = asyncio.create_task(watch_until_back(url, events))
        process = await publish_process(german, "--to", whip_url(url) + "?stream=gone")
        await asyncio.sleep(scaled(6))
        process.send_signal(signal.SIGKILL)  # no DELETE, no RTCP BYE: it just vanishes
        await process.wait()
        for _ in range(int(scaled(40) * 10)):
            if any(e["stream_id"] == "gone" and e.get("state") == "error" for e in events):
                break
            await asyncio.sleep(0.1)
        again = await publish_process(german, "--to", whip_url(url) + "?stream=gone")
        await asyncio.wait_for(watcher, scaled(60))
        again.terminate()  # SIGTERM: the publisher ends its session with a DELETE
        assert await asyncio.wait_for(again.wait(), scaled(20)) == 0
        status, _, _ = await asyncio.to_thread(
            http_call, "GET", url.replace("ws://", "http://").replace("/events", "/health")
        )
        assert status == http.HTTPStatus.OK
    states = [e["state"] for e in events if e["stream_id"] == "gone" and e["type"] == "stream"]
    assert states[:1] == ["started"] and "error" in states, states
    errors = [e for e in events if e["stream_id"] == "gone" and e.get("state") == "error"]
    assert "no media" in errors[0]["message"]
    assert states[states.index("error") + 1] == "started", states  # it came back
    after = [e for e in events if e["wall_time_ns"] > errors[0]["wall_time_ns"]]
    assert any(e["stream_id"] == "file" and e["type"] == "sync" for e in after)
    assert any(e["stream_id"] == "gone" and e["type"] == "sync" for e in after)


async def watch_until_back(url: str, events: list[dict[str, Any]]) -> None:
    """Collect events until the stream ``gone`` errored and then gave sync events again."""
    from clients.talkscope_client import TalkscopeClient

    errored = False
    async with TalkscopeClient(url) as client:
        async for event in client.events():
            events.append(event)
            if event["stream_id"] != "gone":
                continue
            errored = errored or event.get("state") == "error"
            if errored and event["type"] == "sync" and event["state"] == "ok":
                return
