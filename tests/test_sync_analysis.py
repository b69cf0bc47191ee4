"""Sync analysis against a loop-by-loop transcription of syncnet_python's evaluate()."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from scipy import signal

from engine.analysis import SyncEstimate, estimate_sync, medfilt, pairwise_shift_distances

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
