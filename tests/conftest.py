"""Shared fixtures: paths to the real clips in ../shared, media built from them, task hygiene."""

from __future__ import annotations

import asyncio
import csv
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import pytest_asyncio

from engine.core.frame import Frame, FrameKind
from engine.sources import open_source

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = SHARED / "data"
AV = DATA / "av"

# Scale every timeout in the tests (slow or loaded machines): TALKSCOPE_TEST_TIME_FACTOR=3.
TIME_FACTOR = float(os.environ.get("TALKSCOPE_TEST_TIME_FACTOR", "1"))


def scaled(seconds: float) -> float:
    """A timeout scaled by the machine factor."""
    return seconds * TIME_FACTOR


def run_talkscope(
    *args: str, timeout_s: float = 180, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a real process (``python -m engine ARGS``), output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "engine", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, **(env or {})},
        check=False,
    )


def clip(relative: str) -> Path:
    """A clip of ../shared/data/av; skips the test when the shared data is not beside the repo."""
    path = AV / relative
    if not path.exists():
        pytest.skip(f"shared data not found: {path}")
    return path


def _index_rows() -> list[dict[str, str]]:
    """The rows of ../shared/data/clips.csv; none when the shared data is not there."""
    index = DATA / "clips.csv"
    if not index.exists():
        return []
    with index.open(newline="") as handle:
        return list(csv.DictReader(handle))


def clips_of_split(split: str) -> list[Path]:
    """Every clip of one split of clips.csv."""
    return [DATA / row["path"] for row in _index_rows() if row["split"] == split]


async def collect(uri: str | Path, **options: object) -> list[Frame]:
    """Every frame a source yields."""
    async with open_source(str(uri), **options) as source:  # type: ignore[arg-type]
        return [frame async for frame in source]


def audio_of(frames: list[Frame]) -> np.ndarray:
    """The concatenated int16 samples of the audio frames."""
    parts = [f.data for f in frames if f.kind is FrameKind.AUDIO]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int16)


def write_clip(
    path: Path,
    *,
    seconds: float = 2.0,
    fps: int | Fraction = 25,
    size: tuple[int, int] = (160, 120),
    audio: bool = True,
    video: bool = True,
    sample_rate: int = 16000,
    container: str | None = None,
) -> Path:
    """Encode a small synthetic clip (moving gradient, 440 Hz tone) with PyAV."""
    with av.open(str(path), "w", format=container) as out:
        vstream = astream = None
        if video:
            vstream = out.add_stream("libx264", rate=fps)
            vstream.width, vstream.height = size
            vstream.pix_fmt = "yuv420p"
            vstream.options = {"g": "10"}
        if audio:
            astream = out.add_stream("aac", rate=sample_rate)
            astream.layout = "mono"
        if vstream is not None:
            n_frames = int(round(seconds * float(fps)))
            for index in range(n_frames):
                rgb = np.zeros((size[1], size[0], 3), dtype=np.uint8)
                rgb[..., 0] = (np.arange(size[0]) + index * 4) % 256
                frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
                for packet in vstream.encode(frame):
                    out.mux(packet)
            for packet in vstream.encode(None):
                out.mux(packet)
        if astream is not None:
            t = np.arange(int(seconds * sample_rate)) / sample_rate
            tone = (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16)
            for start in range(0, tone.size, 1024):
                chunk = tone[start : start + 1024].reshape(1, -1)
                frame = av.AudioFrame.from_ndarray(chunk, format="s16", layout="mono")
                frame.sample_rate = sample_rate
                for packet in astream.encode(frame):
                    out.mux(packet)
            for packet in astream.encode(None):
                out.mux(packet)
    return path


@pytest.fixture
def demo() -> Path:
    """The embedded demo clip (ships in the package)."""
    from engine.assets import demo_clip

    return demo_clip()


@pytest.fixture
def speech() -> Path:
    """A real single-speaker clip of 60 s (train split)."""
    return clip("edtalk/pose_source2.mp4")


@pytest_asyncio.fixture(autouse=True)
async def fail_on_leaked_tasks() -> AsyncIterator[None]:
    """Fail an async test that leaves tasks running behind it."""
    before = asyncio.all_tasks()
    yield
    await asyncio.sleep(0)
    leaked = [
        t for t in asyncio.all_tasks() - before if t is not asyncio.current_task() and not t.done()
    ]
    for task in leaked:
        task.cancel()
    assert not leaked, f"tasks leaked: {[t.get_name() for t in leaked]}"


@pytest.fixture
def tmp_media(tmp_path: Path) -> Iterator[Path]:
    """A temp dir for media the test builds."""
    yield tmp_path


def decode_rgb(path: Path, *, limit: int | None = None) -> list[np.ndarray]:
    """The pictures of a real clip as RGB arrays (at most ``limit``), at their own rate."""
    pictures: list[np.ndarray] = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            pictures.append(frame.to_ndarray(format="rgb24"))
            if limit is not None and len(pictures) >= limit:
                break
    return pictures


def encode_rgb(
    path: Path,
    pictures: list[np.ndarray],
    *,
    fps: int | Fraction = 25,
    audio: np.ndarray | None = None,
    sample_rate: int = 16000,
) -> Path:
    """Encode RGB pictures (even sizes) and optional int16 mono audio into a clip with PyAV."""
    with av.open(str(path), "w") as out:
        vstream = out.add_stream("libx264", rate=fps)
        vstream.height, vstream.width = pictures[0].shape[:2]
        vstream.pix_fmt = "yuv420p"
        astream = None
        if audio is not None:
            astream = out.add_stream("aac", rate=sample_rate)
            astream.layout = "mono"
        for rgb in pictures:
            for packet in vstream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                out.mux(packet)
        for packet in vstream.encode(None):
            out.mux(packet)
        if astream is not None and audio is not None:
            for start in range(0, audio.size, 1024):
                chunk = np.ascontiguousarray(audio[start : start + 1024].reshape(1, -1))
                frame = av.AudioFrame.from_ndarray(chunk, format="s16", layout="mono")
                frame.sample_rate = sample_rate
                for packet in astream.encode(frame):
                    out.mux(packet)
            for packet in astream.encode(None):
                out.mux(packet)
    return path


def single_face_clips() -> list[Path]:
    """Every clip of clips.csv that shows one visible face (the ``faces`` column)."""
    return [DATA / row["path"] for row in _index_rows() if row["faces"].startswith("single")]


def remux(video_from: Path, audio_from: Path, out: Path, *, audio_delay_s: float = 0.0) -> Path:
    """Copy the video stream of one file and the audio stream of another (maybe the same) into
    ``out`` without re-encoding, the audio's timestamps moved ``audio_delay_s`` later."""
    with (
        av.open(str(video_from)) as vin,
        av.open(str(audio_from)) as ain,
        av.open(str(out), "w") as dst,
    ):
        vsrc, asrc = vin.streams.video[0], ain.streams.audio[0]
        vdst = dst.add_stream_from_template(vsrc)
        adst = dst.add_stream_from_template(asrc)
        assert asrc.time_base is not None
        delay = int(round(audio_delay_s / float(asrc.time_base)))
        for source, target, shift in ((vin, vdst, 0), (ain, adst, delay)):
            stream = source.streams.video[0] if target is vdst else source.streams.audio[0]
            for packet in source.demux(stream):
                if packet.dts is None:
                    continue
                packet.pts = None if packet.pts is None else packet.pts + shift
                packet.dts += shift
                packet.stream = target
                dst.mux(packet)
    return out


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve_udp(path: Path, port: int, seconds: float, stop: threading.Event) -> None:
    """Transcode a real clip to MPEG-TS (H.264 + AAC) and send it over UDP at real time."""
    with (
        av.open(str(path)) as src,
        av.open(f"udp://127.0.0.1:{port}?pkt_size=1316", "w", format="mpegts") as out,
    ):
        vin, ain = src.streams.video[0], src.streams.audio[0]
        vout = out.add_stream("libx264", rate=25)
        vout.width, vout.height, vout.pix_fmt = vin.width, vin.height, "yuv420p"
        vout.options = {"preset": "ultrafast", "tune": "zerolatency", "g": "10"}
        aout = out.add_stream("aac", rate=16000)
        aout.layout = "mono"
        resampler = av.AudioResampler(format="fltp", layout="mono", rate=16000)
        started = time.monotonic()
        for frame in src.decode(vin, ain):
            t = float(frame.time or 0.0)
            if t > seconds or stop.is_set():
                break
            delay = started + t - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if isinstance(frame, av.VideoFrame):
                picture = frame.reformat(format="yuv420p")
                picture.pts, picture.time_base = round(t * 25), Fraction(1, 25)
                for packet in vout.encode(picture):
                    out.mux(packet)
            else:
                for resampled in resampler.resample(frame):
                    for packet in aout.encode(resampled):
                        out.mux(packet)
