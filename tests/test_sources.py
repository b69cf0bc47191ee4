"""Sources on real media: files paced and unpaced, looping, fps normalisation, a UDP stream served
on loopback from a real clip, capture devices, and every kind of bad input."""

from __future__ import annotations

import asyncio
import threading
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from engine.core.clock import VirtualClock
from engine.core.errors import (
    CorruptMedia,
    EngineError,
    MediaNotFound,
    MissingStream,
    SourceUnavailable,
    UnsupportedSource,
    UsageError,
)
from engine.core.frame import Frame, FrameKind
from engine.sources import (
    FileSource,
    ReconnectPolicy,
    SourceState,
    SourceStateChange,
    UrlSource,
    open_source,
)
from tests.conftest import (
    audio_of,
    clip,
    collect,
    free_udp_port,
    scaled,
    serve_udp,
    write_clip,
)

FRAME_NS = 40_000_000


def video_of(frames: list[Frame]) -> list[Frame]:
    return [f for f in frames if f.kind is FrameKind.VIDEO]


def assert_well_formed(frames: list[Frame]) -> None:
    """Video on the 25 fps grid with contiguous seq; audio contiguous in time and seq."""
    video = video_of(frames)
    assert [f.seq for f in video] == list(range(len(video)))
    assert all(f.pts_ns % FRAME_NS == 0 for f in video)
    assert all(b.pts_ns - a.pts_ns == FRAME_NS for a, b in zip(video, video[1:], strict=False))
    audio = [f for f in frames if f.kind is FrameKind.AUDIO]
    assert all(f.data.dtype == np.int16 and f.sample_rate_hz == 16000 for f in audio)
    for a, b in zip(audio, audio[1:], strict=False):
        assert abs(b.pts_ns - a.end_pts_ns) <= 62_500


async def test_demo_file_unpaced(demo: Path) -> None:
    states: list[SourceStateChange] = []
    frames = await collect(demo, on_state=states.append)
    assert_well_formed(frames)
    assert len(video_of(frames)) == 75  # 2.98 s at 25 fps
    assert video_of(frames)[0].data.shape == (288, 360, 3)
    assert abs(audio_of(frames).size / 16000 - 2.98) < 0.03
    assert [s.state for s in states] == [
        SourceState.CONNECTING,
        SourceState.STARTED,
        SourceState.ENDED,
    ]


async def test_paced_file_takes_media_time_on_the_injected_clock(demo: Path) -> None:
    clock = VirtualClock()
    started = time.monotonic()
    frames = await collect(demo, paced=True, clock=clock)
    assert 2.9e9 <= clock.slept_ns <= 3.0e9  # paced by timestamps...
    assert time.monotonic() - started < scaled(2.5)  # ...on virtual time
    assert len(video_of(frames)) == 75


async def test_paced_file_on_the_system_clock_is_real_time(tmp_path: Path) -> None:
    path = write_clip(tmp_path / "one.mp4", seconds=1.0)
    started = time.monotonic()
    await collect(path, paced=True)
    assert time.monotonic() - started >= 0.9


async def test_loop_restarts_with_increasing_timestamps(tmp_path: Path) -> None:
    path = write_clip(tmp_path / "loop.mp4", seconds=1.0)
    video: list[Frame] = []
    async with FileSource(path, loop=True) as source:
        async for frame in source:
            if frame.kind is FrameKind.VIDEO:
                video.append(frame)
            if len(video) == 70:
                break
    assert [f.seq for f in video] == list(range(70))
    assert all(b.pts_ns - a.pts_ns == FRAME_NS for a, b in zip(video, video[1:], strict=False))


@pytest.mark.parametrize(
    ("relative", "expected_frames"),
    [
        ("video-retalking/face_1.mp4", 153),  # 22.13 fps, 700x700
        ("astorfi-lipreading/sample_video.mp4", 174),  # 29.97 fps
        ("pcavs_voxceleb2/Input_00002.mp4", 126),  # 224x224 VoxCeleb crop, 16 kHz mono
    ],
)
async def test_any_fps_is_normalised_to_25_by_timestamp(
    relative: str, expected_frames: int
) -> None:
    frames = await collect(clip(relative))
    assert_well_formed(frames)
    video = video_of(frames)
    assert abs(len(video) - expected_frames) <= 2
    pictures = np.array(sorted({f.meta["src_pts_ns"] for f in video}))
    for frame in video:  # each slot shows the picture nearest to it (of those shown at all)
        distance = abs(frame.meta["src_pts_ns"] - frame.pts_ns)
        assert distance == np.abs(pictures - frame.pts_ns).min()
        assert distance <= 45_000_000


async def test_30fps_synthetic_clip_drops_one_picture_in_six(tmp_path: Path) -> None:
    path = write_clip(tmp_path / "thirty.mp4", seconds=2.0, fps=30)
    video = video_of(await collect(path))
    assert len(video) == 50
    sources = [f.meta["src_pts_ns"] for f in video]
    assert len(set(sources)) == 50  # no duplicates when going down in rate


async def test_low_fps_clip_duplicates_pictures(tmp_path: Path) -> None:
    path = write_clip(tmp_path / "ten.mp4", seconds=2.0, fps=10)
    video = video_of(await collect(path))
    assert 49 <= len(video) <= 51
    assert len({f.meta["src_pts_ns"] for f in video}) == 20


async def test_missing_streams(tmp_path: Path) -> None:
    silent = write_clip(tmp_path / "video_only.mp4", audio=False)
    blind = write_clip(tmp_path / "audio_only.m4a", video=False, container="mp4")
    assert all(f.kind is FrameKind.VIDEO for f in await collect(silent))
    assert all(f.kind is FrameKind.AUDIO for f in await collect(blind))
    with pytest.raises(MissingStream, match="no audio stream"):
        await collect(silent, require_audio=True)
    with pytest.raises(MissingStream, match="no video stream"):
        await collect(blind, require_video=True)


async def test_not_found_not_media_and_truncated(tmp_path: Path, demo: Path) -> None:
    with pytest.raises(MediaNotFound, match="does not exist"):
        open_source(str(tmp_path / "nope.mp4"))
    with pytest.raises(MediaNotFound, match="is a directory"):
        open_source(str(tmp_path))
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    with pytest.raises(CorruptMedia, match="garbage.mp4"):
        await collect(garbage)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(CorruptMedia):
        await collect(empty)
    # An MP4 cut in half loses its index: a clear error, not a PyAV traceback.
    whole = clip("pcavs_voxceleb2/Input_00002.mp4").read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole[: len(whole) // 2])
    try:
        frames = await collect(cut)
    except CorruptMedia:
        pass
    else:  # moov at the front: decodes what is there, then ends cleanly
        assert 0 < len(video_of(frames)) < 126
    # An MPEG-PS cut in half decodes up to the cut.
    half = tmp_path / "half.mpg"
    half.write_bytes(demo.read_bytes()[: demo.stat().st_size // 2])
    assert 10 < len(video_of(await collect(half))) < 75


async def test_garbage_in_the_middle_does_not_stop_the_stream(tmp_path: Path, demo: Path) -> None:
    data = bytearray(demo.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 20_000] = (
        np.random.default_rng(1).integers(0, 256, 20_000, dtype=np.uint8).tobytes()
    )
    damaged = tmp_path / "damaged.mpg"
    damaged.write_bytes(bytes(data))
    frames = await collect(damaged)
    video = video_of(frames)
    assert len(video) >= 60  # the damaged stretch is lost or repeated, the rest plays
    assert video[-1].pts_ns >= 2_800_000_000
    assert [f.seq for f in video] == list(range(len(video)))


def test_unsupported_and_malformed_uris() -> None:
    with pytest.raises(UnsupportedSource, match="no SRT protocol"):
        open_source("srt://127.0.0.1:9000")
    with pytest.raises(UnsupportedSource, match="unknown URL scheme 'gopher'"):
        open_source("gopher://example/x")
    with pytest.raises(UsageError):
        open_source("device:camera=/dev/video0")
    with pytest.raises(UsageError):
        open_source("device:video=nocolon")


async def test_absent_capture_device_is_a_clear_error() -> None:
    with pytest.raises(UnsupportedSource, match="no 'v4l2' capture input"):
        open_source("device:video=v4l2:/dev/video0")
    with pytest.raises(EngineError, match="hw:7,7"):
        await collect("device:audio=alsa:hw:7,7")


async def test_synthetic_capture_device_through_lavfi() -> None:
    uri = "device:video=lavfi:testsrc=size=160x120:rate=30,audio=lavfi:sine=frequency=440"
    kinds: set[FrameKind] = set()
    video: list[Frame] = []
    async with open_source(uri, stream_id="cam") as source:
        async for frame in source:
            kinds.add(frame.kind)
            if frame.kind is FrameKind.VIDEO:
                video.append(frame)
            if len(video) >= 25 and FrameKind.AUDIO in kinds:
                break
    assert video[0].data.shape == (120, 160, 3)
    assert all(f.stream_id == "cam" for f in video)
    assert all(b.pts_ns - a.pts_ns == FRAME_NS for a, b in zip(video, video[1:], strict=False))


async def test_unreachable_url_gives_up_after_its_attempts() -> None:
    states: list[SourceStateChange] = []
    source = UrlSource(
        "rtsp://127.0.0.1:9/none",
        reconnect=ReconnectPolicy(initial_s=0.05, max_attempts=2),
        open_timeout_s=1,
        on_state=states.append,
    )
    with pytest.raises(SourceUnavailable, match="gave up after 2"):
        async with source:
            pass
    assert [s.state for s in states].count(SourceState.RECONNECTING) == 2
    assert [s.attempt for s in states if s.state is SourceState.RECONNECTING] == [1, 2]


# --- a real stream served on loopback --------------------------------------------------------


async def read_udp(port: int, until_frames: int, **options: object) -> list[Frame]:
    source = UrlSource(
        f"udp://127.0.0.1:{port}", open_timeout_s=scaled(8), read_timeout_s=1.0, **options
    )  # type: ignore[arg-type]
    frames: list[Frame] = []
    async with source:
        async for frame in source:
            frames.append(frame)
            if len(video_of(frames)) >= until_frames:
                break
    return frames


@pytest.mark.slow
async def test_udp_mpegts_stream_from_a_real_clip() -> None:
    port = free_udp_port()
    stop = threading.Event()
    reader = asyncio.create_task(read_udp(port, until_frames=50))
    await asyncio.sleep(0.3)  # the reader binds the port first
    sender = asyncio.create_task(
        asyncio.to_thread(serve_udp, clip("pcavs_voxceleb2/Input_00002.mp4"), port, 4.0, stop)
    )
    try:
        frames = await asyncio.wait_for(reader, scaled(20))
    finally:
        stop.set()
        await sender
    video = video_of(frames)
    assert len(video) >= 50
    assert video[0].data.shape == (224, 224, 3)
    assert all(b.pts_ns - a.pts_ns == FRAME_NS for a, b in zip(video, video[1:], strict=False))
    assert audio_of(frames).size > 16000  # more than a second of 16 kHz audio came through


@pytest.mark.slow
async def test_udp_stream_that_stops_and_comes_back_reconnects() -> None:
    port = free_udp_port()
    stop = threading.Event()
    states: list[SourceStateChange] = []
    reader = asyncio.create_task(
        read_udp(
            port, until_frames=60, on_state=states.append, reconnect=ReconnectPolicy(initial_s=0.2)
        )
    )
    await asyncio.sleep(0.3)
    path = clip("pcavs_voxceleb2/Input_00002.mp4")
    await asyncio.to_thread(serve_udp, path, port, 1.6, stop)
    await asyncio.sleep(2.0)  # silence: the reader times out and reconnects
    second = asyncio.create_task(asyncio.to_thread(serve_udp, path, port, 4.5, stop))
    try:
        frames = await asyncio.wait_for(reader, scaled(30))
    finally:
        stop.set()
        await second
    names = [s.state for s in states]
    assert SourceState.RECONNECTING in names
    assert any(s.state is SourceState.STARTED and s.detail == "reconnected" for s in states)
    video = video_of(frames)
    pts = [f.pts_ns for f in video]
    assert pts == sorted(set(pts))  # timestamps keep increasing across the outage
    assert max(b - a for a, b in zip(pts, pts[1:], strict=False)) >= 1_000_000_000  # the gap shows


def test_fraction_fps_clip_builds(tmp_path: Path) -> None:
    path = write_clip(tmp_path / "ntsc.mp4", seconds=1.0, fps=Fraction(30000, 1001))
    assert path.stat().st_size > 0
