"""The page in a real browser: headless Chromium publishes a real clip by WHIP to ``talkscope
serve``, and the events say who speaks and by how much the audio is off.

Chromium's fake camera and microphone play a y4m and a wav that the test makes from a clip of
../shared/data (once in sync, once with the audio 120 ms late). The test drives the page over
the DevTools protocol with the ``websockets`` client the project already has (no Playwright
download), reads the events from ``/events`` like any client, and saves a screenshot of the
page with the speaker highlighted (``test-artifacts/browser-*.png``).

Chromium is Debian's (``/usr/bin/chromium``, installed by ``.ci/run``). Without it the test
skips, unless ``TALKSCOPE_REQUIRE_BROWSER=1`` (CI sets it) makes that a failure.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import statistics
import wave
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect

from clients.talkscope_client import TalkscopeClient
from tests.conftest import REPO, clip, run_talkscope, scaled
from tests.test_live import GERMAN, serving

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = REPO / "test-artifacts"
TOKEN = "page-token"
SECONDS = 16
FAKE_AUDIO_RATE_HZ = 48000

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None and os.environ.get("TALKSCOPE_REQUIRE_BROWSER") != "1",
        reason="Debian's chromium is not installed (apt-get install chromium; .ci/run does)",
    ),
]


# --- the fake camera and microphone --------------------------------------------------------


def write_fake_capture(source: Path, out: Path, *, audio_delay_s: float) -> tuple[Path, Path]:
    """``source`` as a y4m (25 fps, 4:2:0) and a 48 kHz mono wav, the audio delayed."""
    y4m, wav = out.with_suffix(".y4m"), out.with_suffix(".wav")
    with av.open(str(source)) as container, y4m.open("wb") as video_out:
        stream = container.streams.video[0]
        width, height = stream.codec_context.width & ~1, stream.codec_context.height & ~1
        video_out.write(f"YUV4MPEG2 W{width} H{height} F25:1 Ip A1:1 C420jpeg\n".encode())
        for frame in container.decode(stream):
            picture = frame.reformat(width=width, height=height, format="yuv420p")
            video_out.write(b"FRAME\n" + picture.to_ndarray().tobytes())
    samples = _audio(source)
    delay = np.zeros(round(audio_delay_s * FAKE_AUDIO_RATE_HZ), dtype=np.int16)
    samples = np.concatenate([delay, samples])[: samples.size]
    with wave.open(str(wav), "wb") as audio_out:
        audio_out.setnchannels(1)
        audio_out.setsampwidth(2)
        audio_out.setframerate(FAKE_AUDIO_RATE_HZ)
        audio_out.writeframes(samples.tobytes())
    return y4m, wav


def _audio(source: Path) -> np.ndarray:
    resampler = av.AudioResampler(format="s16", layout="mono", rate=FAKE_AUDIO_RATE_HZ)
    chunks = []
    with av.open(str(source)) as container:
        for frame in container.decode(audio=0):
            chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
    chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return np.concatenate(chunks).astype(np.int16)


# --- Chromium over the DevTools protocol ----------------------------------------------------


class DevTools:
    """One page target of a Chromium, driven over its DevTools WebSocket."""

    def __init__(self, connection: ClientConnection) -> None:
        self.connection = connection
        self.ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self.ids)
        await self.connection.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            reply = json.loads(await self.connection.recv())
            if reply.get("id") == call_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return dict(reply["result"])

    async def evaluate(self, expression: str) -> Any:
        result = await self.call(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")


@asynccontextmanager
async def chromium(url: str, y4m: Path, wav: Path, profile: Path) -> AsyncIterator[DevTools]:
    assert CHROMIUM is not None, "chromium is not installed"
    process = await asyncio.create_subprocess_exec(
        CHROMIUM,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--remote-debugging-port=0",
        "--window-size=1280,800",
        "--autoplay-policy=no-user-gesture-required",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-video-capture={y4m}",
        f"--use-file-for-fake-audio-capture={wav}",
        "--disable-features=WebRtcHideLocalIpsWithMdns",
        url,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        port = await _devtools_port(profile / "DevToolsActivePort")
        target = await _page_target(port)
        async with connect(target, max_size=2**26) as connection:
            yield DevTools(connection)
    finally:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            process.kill()
            await process.wait()


async def _devtools_port(path: Path) -> int:
    for _ in range(300):
        if path.exists() and path.read_text().strip():
            return int(path.read_text().split()[0])
        await asyncio.sleep(0.1)
    raise AssertionError("chromium did not open its DevTools port")


async def _page_target(port: int) -> str:
    import urllib.request

    def targets() -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as reply:
            return list(json.load(reply))

    for _ in range(100):
        pages = [t for t in await asyncio.to_thread(targets) if t.get("type") == "page"]
        if pages:
            return str(pages[0]["webSocketDebuggerUrl"])
        await asyncio.sleep(0.1)
    raise AssertionError("chromium has no page target")


async def _page_ready(page: DevTools) -> None:
    for _ in range(200):
        if await page.evaluate("typeof window.talkscope === 'object' && talkscope.state.wsOpen"):
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the page did not load or did not open /events")


# --- the test --------------------------------------------------------------------------------


async def events_of(url: str, stream_id: str, seconds: float) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    async with TalkscopeClient(url, TOKEN) as client:
        await client.subscribe(streams=[stream_id])

        async def gather() -> None:
            async for event in client.events():
                events.append(event)

        try:
            await asyncio.wait_for(gather(), seconds)
        except TimeoutError:
            pass
    return events


@pytest.fixture(scope="module")
def offline_offset() -> int:
    """What ``talkscope sync`` reads on the clip itself: the reference the WebRTC path must keep.

    The model reads the clip's own audio-video offset (+1 frame for German_20s); the test is
    whether the browser, WebRTC and the live engine preserve it, not what the model reads.
    """
    done = run_talkscope("sync", "--json", str(clip(GERMAN)))
    assert done.returncode == 0, done.stderr
    return int(json.loads(done.stdout)["tracks"][0]["offset_frames"])


@pytest.mark.parametrize(("name", "delay_s", "shift"), [("genuine", 0.0, 0), ("late", 0.12, -3)])
async def test_the_page_publishes_the_camera_and_the_speaker_is_highlighted(
    tmp_path: Path, name: str, delay_s: float, shift: int, offline_offset: int
) -> None:
    truth = offline_offset + shift  # the live median over 16 s moves 0..2 frames run to run
    y4m, wav = write_fake_capture(clip(GERMAN), tmp_path / name, audio_delay_s=delay_s)
    async with serving("--no-demo", "--token", TOKEN) as url:
        page_url = url.replace("ws://", "http://").replace("/events", f"/?token={TOKEN}")
        async with chromium(page_url, y4m, wav, tmp_path / "profile") as page:
            await page.call("Runtime.enable")
            await _page_ready(page)
            stream_id = await page.evaluate("talkscope.publish()")
            assert isinstance(stream_id, str) and stream_id
            events = await events_of(url, stream_id, scaled(SECONDS))
            shot = await _screenshot_while_speaking(page)
            state = await page.evaluate("JSON.stringify(talkscope.state)")
            await page.evaluate("talkscope.stop()")
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / f"browser-{name}.png").write_bytes(shot)
    assert json.loads(state)["connection"] == "connected"
    starts = [e for e in events if e["type"] == "track_start"]
    assert starts, "no face was found in the published camera"
    speakers = [e for e in events if e["type"] == "speaker"]
    speaking = [e for e in speakers if e["state"] == "speaking"]
    assert len(speaking) > 0.7 * len(speakers), speakers[-5:]
    assert {e["track_id"] for e in speaking} <= {e["track_id"] for e in starts}
    offsets = [e["offset_frames"] for e in events if e["type"] == "sync" and e["state"] == "ok"]
    assert len(offsets) > 20
    median = statistics.median(offsets)
    assert abs(median - truth) <= 1, (median, truth, offsets)


async def _screenshot_while_speaking(page: DevTools) -> bytes:
    for _ in range(50):
        if await page.evaluate("document.body.dataset.speaking"):
            break
        await asyncio.sleep(0.1)
    assert await page.evaluate("document.body.dataset.speaking"), "no highlight on the page"
    shot = await page.call("Page.captureScreenshot", format="png")
    return base64.b64decode(shot["data"])
