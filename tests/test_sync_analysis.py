"""Sync analysis against a loop-by-loop transcription of syncnet_python's evaluate()."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from scipy import signal

from engine.analysis import (
    SyncEstimate,
    estimate_sync,
    lip_match,
    medfilt,
    pairwise_shift_distances,
)

Array = npt.NDArray[np.float64]


# --- the reference, transcribed ----------------------------------------------------------------


def reference_calc_pdist(feat1: Array, feat2: Array, vshift: int) -> list[Array]:
    """joonson/syncnet_python SyncNetInstance.py calc_pdist, one pair at a time, in numpy.

    ``torch.nn.functional.pairwise_distance(x1, x2)`` is ``||x1 - x2 + 1e-6||_2``.
    """
    win_size = vshift * 2 + 1
    feat2p = np.concatenate(
        [np.zeros((vshift, feat2.shape[1])), feat2, np.zeros((vshift, feat2.shape[1]))]
    )
    dists = []
    for i in range(len(feat1)):
        row = np.empty(win_size)
        for j in range(win_size):
            diff = feat1[i] - feat2p[i + j] + 1e-6
            row[j] = math.sqrt(float(np.sum(diff * diff)))
        dists.append(row)
    return dists


def reference_evaluate(feat1: Array, feat2: Array, vshift: int) -> dict[str, Any]:
    """The lines of SyncNetInstance.evaluate after the features are computed."""
    dists = reference_calc_pdist(feat1, feat2, vshift)
    mdist = np.mean(np.stack(dists, 1), 1)
    minidx = int(np.argmin(mdist))
    minval = mdist[minidx]
    offset = vshift - minidx
    conf = np.median(mdist) - minval
    fdist = np.stack([dist[minidx] for dist in dists])
    fconf = np.median(mdist) - fdist
    with warnings.catch_warnings():  # scipy warns when the kernel is longer than the signal
        warnings.simplefilter("ignore")
        fconfm = signal.medfilt(fconf, kernel_size=9)
    return {
        "dists": np.stack(dists),
        "mdist": mdist,
        "offset": offset,
        "minval": float(minval),
        "conf": float(conf),
        "fconfm": fconfm,
    }


def embeddings(frames: int, dim: int = 32, seed: int = 0) -> tuple[Array, Array]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(frames, dim)), rng.normal(size=(frames, dim))


def unit_vectors(count: int, dim: int, seed: int) -> Array:
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(count, dim))
    unit: Array = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return unit


# --- equality with the reference ---------------------------------------------------------------


@pytest.mark.parametrize("frames", [1, 5, 50, 300])
@pytest.mark.parametrize("max_shift", [15, 3])
def test_matches_reference_on_random_embeddings(frames: int, max_shift: int) -> None:
    video, audio = embeddings(frames, seed=frames + max_shift)
    ref = reference_evaluate(video, audio, max_shift)
    dists = pairwise_shift_distances(video, audio, max_shift=max_shift)
    est = estimate_sync(video, audio, max_shift=max_shift)
    np.testing.assert_allclose(dists, ref["dists"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(est.mean_dists, ref["mdist"], rtol=0, atol=1e-9)
    assert est.offset_frames == ref["offset"]
    assert est.min_dist == pytest.approx(ref["minval"], abs=1e-6)
    assert est.confidence == pytest.approx(ref["conf"], abs=1e-6)
    np.testing.assert_allclose(est.framewise_confidence, ref["fconfm"], rtol=0, atol=1e-6)
    assert est.frames == frames
    assert est.framewise_confidence.shape == (frames,)


def test_matches_reference_near_a_true_offset() -> None:
    # Real embeddings are near-identical at the true offset: check the eps term there too.
    unit = unit_vectors(120, 64, seed=7)
    video, audio = unit[10:110], unit[7:107] + 1e-3 * unit_vectors(100, 64, seed=8)
    ref = reference_evaluate(video, audio, 15)
    est = estimate_sync(video, audio)
    assert est.offset_frames == ref["offset"] == -3  # audio frame i plays instant i - 3: lags
    assert est.min_dist == pytest.approx(ref["minval"], abs=1e-6)
    assert est.confidence == pytest.approx(ref["conf"], abs=1e-6)
    np.testing.assert_allclose(est.framewise_confidence, ref["fconfm"], rtol=0, atol=1e-6)


def test_pairwise_distance_eps_is_that_of_torch() -> None:
    torch = pytest.importorskip("torch")
    video, audio = embeddings(40, dim=16, seed=3)
    audio[5] = video[5]  # a zero difference: the distance is sqrt(dim) * 1e-6, not 0
    ours = pairwise_shift_distances(video, audio, max_shift=15)
    v = torch.from_numpy(video).float()
    a = torch.nn.functional.pad(torch.from_numpy(audio).float(), (0, 0, 15, 15))
    theirs = np.stack(
        [
            torch.nn.functional.pairwise_distance(v[[i], :].repeat(31, 1), a[i : i + 31, :])
            .double()
            .numpy()
            for i in range(len(v))
        ]
    )
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    assert ours[5, 15] == pytest.approx(4 * 1e-6, rel=1e-9)


# --- sign convention ---------------------------------------------------------------------------


@pytest.mark.parametrize("lead", range(-15, 16))
def test_known_shift_gives_offset_with_documented_sign(lead: int) -> None:
    # `unit[t]` is the content of instant t: the picture of frame i shows unit[i + 20]; audio
    # that leads by `lead` frames plays at frame i what the lips show at frame i + lead.
    frames = 100
    unit = unit_vectors(frames + 40, 48, seed=lead + 100)
    video = unit[20 : 20 + frames]
    audio = unit[20 + lead : 20 + lead + frames]
    est = estimate_sync(video, audio)
    assert est.offset_frames == lead
    assert est.offset_ms == pytest.approx(lead * 40.0)
    assert est.confidence > 0.5
    assert reference_evaluate(video, audio, 15)["offset"] == lead


def test_delayed_audio_reads_negative() -> None:
    # The audio track delayed by 4 frames: the sound of frame i is heard at frame i + 4.
    unit = unit_vectors(80, 32, seed=1)
    video = unit[10:70]
    audio = np.zeros_like(video)
    audio[4:] = video[:-4]
    est = estimate_sync(video, audio, fps=25.0)
    assert est.offset_frames == -4
    assert est.offset_ms == pytest.approx(-160.0)
    assert est.offsets_frames[int(np.argmin(est.mean_dists))] == -4


# --- the median filter -------------------------------------------------------------------------


@pytest.mark.parametrize("length", [1, 4, 8, 9, 10, 57])
@pytest.mark.parametrize("kernel", [1, 3, 9, 11])
def test_medfilt_matches_scipy(length: int, kernel: int) -> None:
    x = np.random.default_rng(length * kernel).normal(size=length)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = signal.medfilt(x, kernel_size=kernel)
    np.testing.assert_array_equal(medfilt(x, kernel), expected)


def test_medfilt_refuses_bad_kernels_and_shapes() -> None:
    with pytest.raises(ValueError):
        medfilt(np.zeros(5), 4)
    with pytest.raises(ValueError):
        medfilt(np.zeros(5), 0)
    with pytest.raises(ValueError):
        medfilt(np.zeros((2, 5)), 3)


# --- the estimate and its edge cases -----------------------------------------------------------


def test_estimate_fields_are_consistent_and_read_only() -> None:
    video, audio = embeddings(30, seed=11)
    est = estimate_sync(video, audio, max_shift=5, fps=50.0)
    assert isinstance(est, SyncEstimate)
    assert est.mean_dists.shape == (11,)
    assert list(est.offsets_frames) == list(range(5, -6, -1))
    assert est.min_dist == est.mean_dists.min()
    assert est.confidence == pytest.approx(float(np.median(est.mean_dists)) - est.min_dist)
    assert est.offset_ms == pytest.approx(est.offset_frames * 20.0)
    assert (est.max_shift, est.fps, est.frames) == (5, 50.0, 30)
    with pytest.raises(ValueError):
        est.mean_dists[0] = 0.0
    with pytest.raises(ValueError):
        est.framewise_confidence[0] = 0.0
    with pytest.raises(AttributeError):
        est.offset_frames = 3  # type: ignore[misc]


def test_shorter_than_the_window_and_zero_shift() -> None:
    video, audio = embeddings(3, seed=2)
    est = estimate_sync(video, audio)  # 3 frames, 31 shifts, 9-tap filter
    assert est.frames == 3 and est.framewise_confidence.shape == (3,)
    assert -15 <= est.offset_frames <= 15
    flat = estimate_sync(video, audio, max_shift=0)
    assert flat.offset_frames == 0 and flat.confidence == 0.0


def test_float32_input_is_accepted() -> None:
    video, audio = embeddings(20, seed=4)
    a = estimate_sync(video.astype(np.float32), audio.astype(np.float32))
    b = estimate_sync(video.astype(np.float32).astype(np.float64), audio.astype(np.float32))
    assert a.offset_frames == b.offset_frames
    assert a.min_dist == b.min_dist


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_is_refused(bad: float) -> None:
    video, audio = embeddings(10)
    video[3, 1] = bad
    with pytest.raises(ValueError, match="NaN"):
        estimate_sync(video, audio)
    with pytest.raises(ValueError, match="NaN"):
        pairwise_shift_distances(audio, video)


def test_bad_shapes_and_arguments_are_refused() -> None:
    video, audio = embeddings(10)
    with pytest.raises(ValueError, match="differ"):
        estimate_sync(video, audio[:9])
    with pytest.raises(ValueError, match="differ"):
        estimate_sync(video, audio[:, :5])
    with pytest.raises(ValueError, match="frames, dim"):
        estimate_sync(video[0], audio[0])
    with pytest.raises(ValueError, match="empty"):
        estimate_sync(video[:0], audio[:0])
    with pytest.raises(ValueError):
        estimate_sync(video, audio, max_shift=-1)
    with pytest.raises(TypeError):
        estimate_sync(video, audio, max_shift=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        estimate_sync(video, audio, fps=0.0)
    assert estimate_sync(video, audio, max_shift=np.int64(2)).max_shift == 2  # type: ignore[arg-type]


# --- chunks for chunk models (SyncNet-lite) ------------------------------------------------


def test_chunks_cover_every_window_with_context_and_edge_padding() -> None:
    from engine.analysis.windows import frame_chunks, mfcc_chunks

    frames = np.arange(100, dtype=np.int64)[:, None]  # frame i holds i
    mfcc = np.arange(500, dtype=np.float32)[:, None].repeat(13, axis=1)  # step j holds j
    video = frame_chunks(frames, 10, 60, chunk=48, context=6)
    audio = mfcc_chunks(mfcc, 42, 60, chunk=48, context=6)
    assert video.shape == (2, 64, 1) and audio.shape == (2, 13, 256)
    # chunk 0: 6 context frames before the run repeat its first frame, then window 0 starts
    assert video[0, :7, 0].tolist() == [10] * 7 and video[0, 7, 0] == 11
    # chunk 1 starts 48 windows later, minus the context
    assert video[1, 0, 0] == 10 + 48 - 6
    # after the run's last frame (window 59 ends at frame 73) the last frame repeats
    assert video[1, -1, 0] == 73 and video[1, 21, 0] == 73
    # MFCC: 4 steps a frame, in step with the frames, real sound before the run
    assert audio[0, 0, 0] == 42 - 24 and audio[0, 0, 24] == 42
    assert audio[1, 0, 24] == 42 + 4 * 48
    # steps past the end of the MFCC repeat the last one
    late = mfcc_chunks(mfcc[:300], 250, 60, chunk=48, context=6)
    assert late[1].max() == 299


def test_chunk_model_windows_equal_whole_sequence_windows() -> None:
    """Chunked inference gives the embeddings of one pass over the whole run (inner windows)."""
    import torch

    from engine.analysis.windows import frame_chunks, mfcc_chunks
    from engine.models.syncnet_lite import SyncNetLiteModel

    torch.manual_seed(0)
    model = SyncNetLiteModel().eval()
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (120, 112, 112), dtype=np.uint8)
    mfcc = rng.standard_normal((600, 13)).astype(np.float32) * 5
    windows = 116 - 12  # every window with 6 frames of real context on both sides
    faces = frame_chunks(frames, 6, windows, chunk=48, context=6)
    steps = mfcc_chunks(mfcc, 24, windows, chunk=48, context=6)
    with torch.inference_mode():
        video = model.forward_video(torch.from_numpy(faces / np.float32(255)))
        audio = model.forward_audio(torch.from_numpy(steps)[:, None])
        whole_v = model.video_head(model.visual(torch.from_numpy(frames / np.float32(255))[None]))
        whole_a = model.audio_head(model.audio(torch.from_numpy(mfcc.T.copy())[None, None]))
    inner = slice(6, windows - 6)  # windows whose context lies inside the run
    got_v = video.reshape(-1, 256)[:windows][inner]
    got_a = audio.reshape(-1, 256)[:windows][inner]
    np.testing.assert_allclose(got_v, whole_v[0, 6 : 6 + windows][inner], atol=1e-4)
    np.testing.assert_allclose(got_a, whole_a[0, 6 : 6 + windows][inner], atol=1e-4)


def test_audio_around_the_run_replaces_the_zero_padding() -> None:
    rng = np.random.default_rng(3)
    video = rng.standard_normal((40, 8))
    audio = rng.standard_normal((40 + 5 + 15, 8))  # 5 rows before the run, 15 after
    got = estimate_sync(video, audio, max_shift=15, audio_lead=5)
    padded = np.zeros((40 + 30, 8))
    padded[10 : 10 + audio.shape[0]] = audio  # row 5 of audio pairs with video row 0
    direct = np.array(
        [[np.linalg.norm(video[i] - padded[i + j] + 1e-6) for j in range(31)] for i in range(40)]
    )
    np.testing.assert_allclose(got.mean_dists, direct.mean(axis=0), rtol=1e-12)
    # without context, the same call is syncnet_python's (zeros outside the run)
    plain = estimate_sync(video, audio[5:45], max_shift=15)
    assert not np.allclose(plain.mean_dists, got.mean_dists)
    with pytest.raises(ValueError, match="differ in shape"):
        estimate_sync(video, audio, max_shift=15, audio_lead=16)
    with pytest.raises(ValueError, match="after the run"):
        estimate_sync(video, audio, max_shift=15, audio_lead=0)


def test_lip_match_with_the_whole_shift_range_is_lse_c_at_sync() -> None:
    rng = np.random.default_rng(5)
    video = rng.standard_normal((25, 8))
    audio = rng.standard_normal((25 + 30, 8))
    estimate = estimate_sync(video, audio, max_shift=15, audio_lead=15)
    means = estimate.mean_dists  # column j reads audio row i + j (here), offset 15 - j
    expected = np.median(means) - means[14:17].min()
    assert lip_match(video, audio, before=15, after=15, near=1) == pytest.approx(expected, 1e-12)


def test_lip_match_needs_only_a_little_sound_past_the_lips() -> None:
    rng = np.random.default_rng(6)
    sound = rng.standard_normal((60, 16))
    lips = sound[20:45] + 0.3 * rng.standard_normal((25, 16))  # these lips fit rows 20..44
    other = rng.standard_normal((25, 16))
    audio = sound[5:47]  # 15 rows before the run and 2 after
    fitting = lip_match(lips, audio, before=15, after=2)
    assert fitting > 1.0
    assert abs(lip_match(other, audio, before=15, after=2)) < 0.5
    late = sound[7:49]  # the lips fit 2 rows earlier than paired: still within near=2 ...
    assert lip_match(lips, late, before=15, after=2, near=2) == pytest.approx(fitting, rel=0.2)
    assert lip_match(lips, late, before=15, after=2, near=0) < 0.5 * fitting  # ... not exactly
    with pytest.raises(ValueError, match="audio must be"):
        lip_match(lips, audio[:-1], before=15, after=2)
    with pytest.raises(ValueError, match="near"):
        lip_match(lips, audio, before=15, after=2, near=3)


def test_audio_window_range_counts_whole_windows_around_the_run() -> None:
    from engine.analysis.windows import audio_window_range

    # first window at step 42: positions -10 (step 2) .. (500 - 20 - 42) // 4 = 109
    assert audio_window_range(42, 500) == (-10, 109)
    assert audio_window_range(0, 20) == (0, 0)  # exactly one window, at the run's start


def test_windows_pair_with_the_nearest_mfcc_frame_when_audio_is_off_the_grid() -> None:
    from engine.analysis.windows import pair_windows

    pts = np.arange(30, dtype=np.int64) * 40_000_000
    mfcc = np.arange(200, dtype=np.float32)[:, None].repeat(13, axis=1)
    on = pair_windows(pts, mfcc, 0)
    assert on.starts.tolist() == list(range(26)) and on.steps[:3].tolist() == [0, 4, 8]
    # audio starting 96.009 ms in (a re-muxed AAC stream): frame 3 (120 ms) pairs with step 2
    late = pair_windows(pts, mfcc, 96_009_000)
    assert late.starts[0] == 3 and late.steps[0] == 2
    np.testing.assert_array_equal(late.audio[0], mfcc[2:22].T)
    assert np.all(np.diff(late.steps) == 4)
