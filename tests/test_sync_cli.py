"""``talkscope sync`` and ``talkscope models``: weights lookup, routing, batching, the CLI contract.

No trained weights exist yet, so the runs here use a state dict saved from a *seeded, freshly
initialised* model. They check structure, routing and determinism only: the offsets these
weights give mean nothing, and no test claims any accuracy.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from engine.analysis.windows import longest_run
from engine.core.errors import NoWeights, WeightsError
from engine.models import loading
from engine.models.export import export_towers
from engine.models.inputs import audio_input, crop_window_shape, video_input
from engine.models.loading import resolve_weights, tower_backends
from engine.models.spec import SYNCNET_LITE, SYNCNET_V2
from engine.models.syncnet_lite import SyncNetLiteModel
from engine.models.syncnet_v2 import SyncNetV2Model
from pipelines.sync import SyncRunner
from tests.conftest import clip, remux, run_talkscope

SYNC_CLIP = "mimictalk/German_20s.mp4"
"""A test-split clip (an identity never trained on): 20 s, one face, speech throughout."""
FOREIGN_CLIP = "dfrf/cnn2_25fps.mp4"
"""Another test-split clip whose audio stands in for someone else speaking."""

TRACK_KEYS = {"track_id", "offset_frames", "offset_ms", "confidence", "min_dist", "frames", "box"}


def talkscope(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_talkscope(*args, timeout_s=180, env=env)


def json_lines(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Seeded random state dicts of both models, and the lite one exported to ONNX."""
    directory = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    lite = SyncNetLiteModel().eval()
    torch.save(lite.state_dict(), directory / "lite.pt")
    export_towers(lite, SYNCNET_LITE, directory / "lite_onnx")
    torch.manual_seed(0)
    torch.save(SyncNetV2Model().state_dict(), directory / "v2.pt")
    return directory


@pytest.fixture
def no_models(tmp_path: Path) -> dict[str, str]:
    """An empty $TALKSCOPE_MODELS, so a syncnet_v2.model in the user's cache does not count."""
    empty = tmp_path / "models"
    empty.mkdir()
    return {"TALKSCOPE_MODELS": str(empty)}


# --- the CLI, as a user runs it -----------------------------------------------------------------


def test_no_weights_exits_2_with_one_clear_line(no_models: dict[str, str]) -> None:
    good = str(clip("grid_lipnet/bbaf2n.mpg"))
    v2 = talkscope("sync", "--model", "syncnet-v2", good, env=no_models)
    assert v2.returncode == 2, v2.stderr
    assert v2.stderr.count("\n") == 1 and "Traceback" not in v2.stderr
    assert v2.stderr.startswith("talkscope: error: no trained weights are installed for syncnet-v2")
    assert "syncnet_v2.model" in v2.stderr and "--weights" in v2.stderr
    assert SYNCNET_V2.weights is not None and SYNCNET_V2.weights.source in v2.stderr
    assert v2.stdout == ""

    lite = talkscope("sync", "--json", good, env=no_models)  # the default model
    if loading.installed_weights(SYNCNET_LITE) is not None:  # once the trained model ships
        assert lite.returncode == 0, lite.stderr
        return
    assert lite.returncode == 2, lite.stderr
    assert lite.stderr.count("\n") == 1 and "Traceback" not in lite.stderr
    assert "no trained weights are installed for syncnet-lite" in lite.stderr
    assert "[NoWeights]" in lite.stderr and lite.stdout == ""


def test_models_lists_both_with_where_and_how(no_models: dict[str, str]) -> None:
    result = talkscope("models", "--json", env=no_models)
    assert result.returncode == 0, result.stderr
    models = {line["model"]: line for line in json_lines(result)}
    assert set(models) == {"syncnet-lite", "syncnet-v2"}
    v2 = models["syncnet-v2"]
    assert v2["installed"] is False and v2["weights"] is None
    assert v2["embedding_size"] == 1024
    assert v2["inputs"]["video"]["shape"] == ["batch", 3, 5, 224, 224]
    assert v2["looked_for"] == [str(Path(no_models["TALKSCOPE_MODELS"]) / "syncnet_v2.model")]
    assert v2["source"] == "http://www.robots.ox.ac.uk/~vgg/software/lipsync/data/syncnet_v2.model"
    assert v2["git_blob_sha1"] == "d714bbf3b30324ced69e3815fc41ae6dc519303c"
    lite = models["syncnet-lite"]
    assert lite["embedding_size"] == 256 and lite["mfcc_preset"] == "syncnet"
    assert "engine/models/weights/syncnet_lite" in lite["looked_for"][0]

    text = talkscope("models", env=no_models)
    assert text.returncode == 0 and "syncnet_v2.model" in text.stdout
    assert "not installed" in text.stdout


def test_folder_with_a_broken_file_jobs_2(tmp_path: Path, weights_dir: Path) -> None:
    folder = tmp_path / "clips"
    folder.mkdir()
    for name in ("bbaf2n.mpg", "swiz3n.mpg"):
        shutil.copy(clip(f"grid_lipnet/{name}"), folder / name)
    (folder / "broken.mp4").write_bytes(b"not media at all" * 200)
    (folder / "notes.txt").write_text("not a media file: skipped")
    args = [
        "sync",
        "--json",
        "--jobs",
        "2",
        "--progress",
        "--weights",
        str(weights_dir / "lite.pt"),
    ]
    result = talkscope(*args, str(folder))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = json_lines(result)
    assert [Path(line["file"]).name for line in lines] == ["bbaf2n.mpg", "broken.mp4", "swiz3n.mpg"]
    broken = lines[1]
    assert set(broken) == {"file", "error"} and "broken.mp4" in broken["error"]
    for line in (lines[0], lines[2]):
        assert set(line) == {"file", "tracks", "seconds"}
        assert isinstance(line["seconds"], float) and line["seconds"] > 0
        (track,) = line["tracks"]
        assert set(track) == TRACK_KEYS
        assert isinstance(track["offset_frames"], int) and -15 <= track["offset_frames"] <= 15
        assert track["offset_ms"] == pytest.approx(40.0 * track["offset_frames"])
        assert track["frames"] == 70  # 75 frames, 297 MFCC steps: 70 windows with sound
        assert track["min_dist"] > 0 and track["confidence"] >= 0
        assert len(track["box"]) == 4
    assert "files 3/3" in result.stderr and "windows 140/140" in result.stderr

    # The same file alone, one job, text mode: the same numbers (batches differ, rows do not).
    alone = talkscope("sync", "--weights", str(weights_dir / "lite.pt"), str(folder / "bbaf2n.mpg"))
    assert alone.returncode == 0, alone.stderr
    first = lines[0]["tracks"][0]
    assert alone.stdout.splitlines()[0].startswith("syncnet-lite weights ")
    assert f"{first['offset_frames']:+d} fr" in alone.stdout
    assert (
        f"{first['confidence']:.3f}" in alone.stdout and f"{first['min_dist']:.3f}" in alone.stdout
    )


def test_onnx_folder_and_torch_backend_route_to_the_same_numbers(weights_dir: Path) -> None:
    good = str(clip("grid_lipnet/swiz3n.mpg"))
    runs = [
        ["--weights", str(weights_dir / "lite.pt")],
        ["--weights", str(weights_dir / "lite_onnx")],
        ["--weights", str(weights_dir / "lite.pt"), "--backend", "torch"],
    ]
    tracks = []
    for extra in runs:
        result = talkscope("sync", "--json", *extra, good)
        assert result.returncode == 0, (extra, result.stderr)
        (line,) = json_lines(result)
        tracks.append(line["tracks"][0])
    for track in tracks[1:]:
        assert track["offset_frames"] == tracks[0]["offset_frames"]
        assert track["min_dist"] == pytest.approx(tracks[0]["min_dist"], rel=1e-4)
        assert track["confidence"] == pytest.approx(tracks[0]["confidence"], rel=1e-3, abs=1e-5)

    wrong = talkscope(
        "sync", "--backend", "torch", "--weights", str(weights_dir / "lite_onnx"), good
    )
    assert wrong.returncode == 2 and "--backend torch needs torch weights" in wrong.stderr
    other = talkscope("sync", "--weights", str(weights_dir / "v2.pt"), good)
    assert other.returncode == 2 and "not syncnet-lite weights" in other.stderr
    assert other.stderr.count("\n") == 1


def test_a_failing_model_fails_each_file_with_one_line_and_exit_1(
    tmp_path: Path, weights_dir: Path
) -> None:
    import onnx
    from onnx import TensorProto, helper

    # A real graph with the video tower's input that sums each batch to one number: the batcher
    # gets a scalar back for a batch of windows, and fails that batch.
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(weights_dir / "lite_onnx" / "syncnet_lite_audio.onnx", broken / "audio.onnx")
    video = helper.make_tensor_value_info("faces", TensorProto.FLOAT, ["batch", 64, 112, 112])
    total = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [])
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["faces"], ["embedding"], keepdims=0)],
        "sum",
        [video],
        [total],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.save(model, broken / "video.onnx")
    files = [str(clip("grid_lipnet/bbaf2n.mpg")), str(clip("grid_lipnet/swiz3n.mpg"))]
    result = talkscope("sync", "--json", "--jobs", "2", "--weights", str(broken), *files)
    assert result.returncode == 1, result.stderr
    lines = json_lines(result)
    assert [line["file"] for line in lines] == files
    for line in lines:
        assert set(line) == {"file", "error"} and "run_batch failed" in line["error"]
    assert "Traceback" not in result.stderr and "ExceptionGroup" not in result.stdout


async def test_nan_embeddings_give_a_reason_not_a_crash(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SyncNetLiteModel()
    state = model.state_dict()
    bias = "video_head.project.bias"
    state[bias] = torch.full_like(state[bias], float("nan"))
    torch.save(state, tmp_path / "nan.pt")
    resolved = resolve_weights("syncnet-lite", tmp_path / "nan.pt")
    backends = tower_backends(resolved, backend="torch")
    async with SyncRunner(SYNCNET_LITE, backends) as runner:
        report = await runner.analyse_file(str(clip("grid_lipnet/bbaf2n.mpg")), max_seconds=2)
    (track,) = report.tracks
    assert track.offset_frames is None and track.reason is not None and "NaN" in track.reason


def test_syncnet_v2_on_one_short_clip(weights_dir: Path) -> None:
    # ~35 ms a window on a CPU: 2 s of video, at most 46 windows (the audio decoded by the time
    # the 50th picture is may be a little shorter).
    args = ["--model", "syncnet-v2", "--weights", str(weights_dir / "v2.pt"), "--seconds", "2"]
    result = talkscope("sync", "--json", *args, str(clip("grid_lipnet/bbaf2n.mpg")))
    assert result.returncode == 0, result.stderr
    (line,) = json_lines(result)
    (track,) = line["tracks"]
    assert set(track) == TRACK_KEYS and 31 <= track["frames"] <= 46
    assert np.isfinite(track["min_dist"]) and track["confidence"] >= 0


# --- the library, in process ------------------------------------------------------------------


def test_resolve_weights_order_and_errors(
    tmp_path: Path, weights_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TALKSCOPE_MODELS", str(tmp_path / "models"))
    monkeypatch.setattr(loading, "EMBEDDED_WEIGHTS_DIR", tmp_path / "embedded")
    with pytest.raises(NoWeights, match="no trained weights are installed for syncnet-lite"):
        resolve_weights("syncnet-lite")
    with pytest.raises(NoWeights, match=str(tmp_path / "models" / "syncnet_v2.model")):
        resolve_weights("syncnet_v2")

    # The embedded pair, once it ships, is found with no argument.
    embedded = tmp_path / "embedded" / "syncnet_lite"
    embedded.mkdir(parents=True)
    shutil.copy(weights_dir / "lite_onnx" / "syncnet_lite_video.onnx", embedded / "video.onnx")
    with pytest.raises(WeightsError, match="audio.onnx is missing"):
        resolve_weights("syncnet-lite")
    shutil.copy(weights_dir / "lite_onnx" / "syncnet_lite_audio.onnx", embedded / "audio.onnx")
    found = resolve_weights("syncnet-lite")
    assert found.origin == "embedded" and found.format == "onnx" and found.path == embedded
    assert loading.installed_weights(SYNCNET_LITE) == embedded

    # An explicit --weights wins; the models directory serves syncnet_v2.
    given = resolve_weights("syncnet-lite", weights_dir / "lite.pt")
    assert given.origin == "argument" and given.format == "torch"
    (tmp_path / "models").mkdir()
    shutil.copy(weights_dir / "v2.pt", tmp_path / "models" / "syncnet_v2.model")
    v2 = resolve_weights("syncnet-v2")
    assert v2.origin == "models_dir" and isinstance(v2.module, SyncNetV2Model)
    assert loading.is_published_file(SYNCNET_V2, v2.path) is False

    with pytest.raises(WeightsError, match="one tower"):
        resolve_weights("syncnet-lite", embedded / "video.onnx")
    with pytest.raises(WeightsError, match="not found"):
        resolve_weights("syncnet-lite", tmp_path / "nope.pt")
    with pytest.raises(WeightsError, match="must hold video.onnx and audio.onnx"):
        resolve_weights("syncnet-lite", tmp_path)


def test_model_inputs_layouts() -> None:
    rng = np.random.default_rng(0)
    faces = rng.integers(0, 256, (2, *crop_window_shape(SYNCNET_V2)), dtype=np.uint8)
    video = video_input(SYNCNET_V2, faces)
    assert video.shape == (2, 3, 5, 224, 224) and video.dtype == np.float32
    # channel 0 is blue: the last RGB channel, unscaled
    np.testing.assert_array_equal(video[1, 0, 3], faces[1, 3, :, :, 2].astype(np.float32))
    np.testing.assert_array_equal(video[1, 2, 3], faces[1, 3, :, :, 0].astype(np.float32))
    chunks = rng.integers(0, 256, (3, 64, 112, 112), dtype=np.uint8)
    grey = video_input(SYNCNET_LITE, chunks)
    assert grey.shape == (3, 64, 112, 112) and float(grey.max()) <= 1.0
    np.testing.assert_allclose(grey * 255, chunks, atol=1e-4)
    mfcc = np.zeros((4, 13, 256), np.float32)
    assert audio_input(SYNCNET_LITE, mfcc).shape == (4, 1, 13, 256)
    assert audio_input(SYNCNET_V2, mfcc[..., :20]).shape == (4, 1, 13, 20)
    with pytest.raises(ValueError, match="must be"):
        video_input(SYNCNET_LITE, faces)


def test_longest_run_of_consecutive_windows() -> None:
    starts = np.array([0, 1, 2, 5, 6, 7, 8, 9, 11], dtype=np.int64)
    pts = starts * 40_000_000
    assert longest_run(starts, pts) == slice(3, 8)
    assert longest_run(starts[:0], pts[:0]) == slice(0, 0)


async def test_files_share_batches_and_short_tracks_get_a_reason(weights_dir: Path) -> None:
    resolved = resolve_weights("syncnet-lite", weights_dir / "lite_onnx")
    backends = tower_backends(resolved, threads=1)
    files = [str(clip("grid_lipnet/bbaf2n.mpg")), str(clip("grid_lipnet/swiz3n.mpg"))]
    alone = []
    async with SyncRunner(SYNCNET_LITE, backends) as runner:
        for uri in files:
            alone.append(await runner.analyse_file(uri))
    # A batch of 4 chunks that only runs when full (or after 30 s): each file's 70 windows are
    # 2 chunks of 48, so both files' windows go in one batch.
    async with SyncRunner(SYNCNET_LITE, backends, max_batch=4, max_wait_ms=30_000) as shared:
        reports = await asyncio.gather(*(shared.analyse_file(uri) for uri in files))
        stats = shared.stats
    assert stats["video"].batches == stats["audio"].batches == 1
    assert stats["video"].items == 4 and shared.progress.windows_done == 140
    for report, single in zip(reports, alone, strict=True):  # each file got its own rows back
        (track,), (expected,) = report.tracks, single.tracks
        assert report.source == single.source and track.offset_frames == expected.offset_frames
        assert track.min_dist == pytest.approx(expected.min_dist, rel=1e-5)

    async with SyncRunner(SYNCNET_LITE, backends, min_windows=71) as strict:
        report = await strict.analyse_file(files[0])
    (track,) = report.tracks
    assert track.offset_frames is None and track.confidence is None and track.frames == 70
    assert track.reason is not None and "71 needed" in track.reason
    assert set(track.to_json()) == TRACK_KEYS | {"reason"}


@pytest.mark.slow
def test_default_model_reads_a_120_ms_audio_delay_as_minus_3_frames(tmp_path: Path) -> None:
    """The shipped weights, no flags: a real file re-muxed with its audio 120 ms late reads
    about -3 frames, with more confidence than the same pictures with another clip's audio."""
    if loading.installed_weights(SYNCNET_LITE) is None:
        pytest.skip("no trained syncnet-lite weights are installed")
    video = clip(SYNC_CLIP)
    delayed = remux(video, video, tmp_path / "delayed.mp4", audio_delay_s=0.12)
    foreign = remux(video, clip(FOREIGN_CLIP), tmp_path / "foreign.mp4")
    result = talkscope("sync", "--json", str(delayed), str(foreign))
    assert result.returncode == 0, result.stderr
    late, other = (max(line["tracks"], key=lambda t: t["frames"]) for line in json_lines(result))
    assert abs(late["offset_frames"] + 3) <= 1, late
    assert late["offset_ms"] == pytest.approx(40.0 * late["offset_frames"])
    assert late["confidence"] > other["confidence"], (late, other)
