"""Audio front-end: python_speech_features parity on real speech, chunk-invariance, edge cases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import python_speech_features as psf
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.errors import UsageError
from engine.core.frame import Frame, audio_frame, merge_gap
from engine.dsp import PRESETS, StftConfig, StreamingMfcc, StreamingStft, mfcc, stft
from engine.dsp.mel import mel_filterbank
from engine.dsp.stage import MfccBlock, MfccStage
from engine.dsp.stft import make_window
from tests.conftest import audio_of, clip, collect


@pytest.fixture(scope="module")
def real_speech() -> np.ndarray:
    """20 s of real speech, decoded and resampled to 16 kHz mono int16 by our own source."""
    import asyncio

    frames = asyncio.run(collect(clip("edtalk/pose_source2.mp4")))
    return audio_of(frames)[: 20 * 16000]


def test_syncnet_preset_matches_python_speech_features_on_real_speech(
    real_speech: np.ndarray,
) -> None:
    ours = mfcc(real_speech, 16000, "syncnet")
    reference = psf.mfcc(real_speech, 16000)
    assert ours.shape == reference.shape == (1999, 13)
    assert np.abs(ours - reference).max() <= 1e-3


def test_hamming_preset_is_psf_with_a_hamming_window(real_speech: np.ndarray) -> None:
    ours = mfcc(real_speech, 16000, "hamming")
    reference = psf.mfcc(real_speech, 16000, winfunc=np.hamming)
    assert np.abs(ours - reference).max() <= 1e-3
    assert np.abs(ours - mfcc(real_speech, 16000, "syncnet")).max() > 0.1  # the window matters


@pytest.mark.parametrize(
    "clip_path", ["grid_lipnet/swiz3n.mpg", "spectre/M003_level_1_disgusted_015.mp4"]
)
def test_parity_on_other_real_clips_and_rates(clip_path: str) -> None:
    import asyncio

    samples = audio_of(asyncio.run(collect(clip(clip_path))))
    assert np.abs(mfcc(samples, 16000) - psf.mfcc(samples, 16000)).max() <= 1e-3


@pytest.mark.parametrize("length", [1, 100, 399, 400, 401, 559, 560, 561, 16000])
def test_frame_count_and_end_padding_follow_psf(length: int) -> None:
    signal = np.random.default_rng(length).integers(-3000, 3000, length).astype(np.int16)
    ours = mfcc(signal, 16000)
    reference = psf.mfcc(signal, 16000)
    assert ours.shape == reference.shape
    assert np.abs(ours - reference).max() <= 1e-3


def test_other_sample_rates_follow_psf() -> None:
    signal = np.random.default_rng(0).integers(-3000, 3000, 8000).astype(np.int16)
    assert np.abs(mfcc(signal, 8000) - psf.mfcc(signal, 8000, nfft=512)).max() <= 1e-3


def test_silence_and_empty_input() -> None:
    assert mfcc(np.zeros(0, np.int16), 16000).shape == (0, 13)
    silent = mfcc(np.zeros(1600, np.int16), 16000)
    assert np.isfinite(silent).all()
    assert np.abs(silent - psf.mfcc(np.zeros(1600, np.int16), 16000)).max() <= 1e-3


def test_bad_input_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="unknown MFCC preset"):
        mfcc(np.zeros(10), 16000, "nope")
    with pytest.raises(UsageError, match="1-D"):
        mfcc(np.zeros((2, 10)), 16000)
    with pytest.raises(UsageError, match="1-D"):
        StreamingMfcc().push(np.array(["a"]))
    with pytest.raises(UsageError, match="shorter than the window"):
        StreamingStft(StftConfig(n_fft=256))
    with pytest.raises(UsageError, match="unknown window"):
        make_window("kaiser7", 10)


def test_power_spectrum_matches_psf_powspec(real_speech: np.ndarray) -> None:
    from python_speech_features import sigproc

    signal = real_speech[:16000]
    config = StftConfig(window="hamming")
    emphasised = sigproc.preemphasis(signal, 0.97)
    frames = sigproc.framesig(emphasised, 400, 160, np.hamming)
    reference = sigproc.powspec(frames, 512)
    ours = stft(signal, config, power=True)
    assert ours.shape == reference.shape
    assert np.allclose(ours, reference, rtol=1e-9, atol=1e-6)
    magnitude = stft(signal, config)
    assert np.allclose(magnitude, np.sqrt(reference * 512), rtol=1e-9, atol=1e-6)


def test_mel_filterbank_is_psf_get_filterbanks() -> None:
    from python_speech_features.base import get_filterbanks

    assert np.array_equal(
        mel_filterbank(26, 512, 16000, 0, 8000), get_filterbanks(26, 512, 16000, 0, 8000)
    )
    assert np.array_equal(
        mel_filterbank(40, 1024, 48000, 300, 12000), get_filterbanks(40, 1024, 48000, 300, 12000)
    )


def split(signal: np.ndarray, cuts: list[int]) -> list[np.ndarray]:
    points = sorted({min(max(c, 0), signal.size) for c in cuts})
    return np.split(signal, points)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    length=st.integers(0, 6000),
    cuts=st.lists(st.integers(0, 6000), max_size=25),
    preset=st.sampled_from(sorted(PRESETS)),
)
def test_streaming_mfcc_is_chunk_invariant(
    seed: int, length: int, cuts: list[int], preset: str
) -> None:
    signal = np.random.default_rng(seed).integers(-20000, 20000, length).astype(np.int16)
    batch = mfcc(signal, 16000, preset)
    stream = StreamingMfcc(preset)
    parts = [stream.push(part) for part in split(signal, cuts)]
    parts.append(stream.flush())
    streamed = np.concatenate(parts)
    assert streamed.shape == batch.shape
    assert np.abs(streamed - batch).max(initial=0.0) <= 1e-6
    assert np.array_equal(streamed, batch)  # in fact bit-identical


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    length=st.integers(0, 4000),
    cuts=st.lists(st.integers(0, 4000), max_size=20),
    power=st.booleans(),
)
def test_streaming_stft_is_chunk_invariant(
    seed: int, length: int, cuts: list[int], power: bool
) -> None:
    signal = np.random.default_rng(seed).standard_normal(length)
    batch = stft(signal, power=power)
    stream = StreamingStft(power=power)
    streamed = np.concatenate([*(stream.push(p) for p in split(signal, cuts)), stream.flush()])
    assert np.array_equal(streamed, batch)


def test_stream_restarts_cleanly_after_flush(real_speech: np.ndarray) -> None:
    stream = StreamingMfcc()
    first = np.concatenate([stream.push(real_speech[:8000]), stream.flush()])
    second = np.concatenate([stream.push(real_speech[:8000]), stream.flush()])
    assert np.array_equal(first, second)


def test_one_hop_in_gives_one_frame_out_in_steady_state(real_speech: np.ndarray) -> None:
    stream = StreamingMfcc()
    assert stream.push(real_speech[:400]).shape == (1, 13)
    for start in range(400, 400 + 160 * 50, 160):
        assert stream.push(real_speech[start : start + 160]).shape == (1, 13)


# --- the stage -------------------------------------------------------------------------------


def chunks_of(signal: np.ndarray, size: int, start_ns: int = 0) -> list[Frame]:
    out = []
    for index, begin in enumerate(range(0, signal.size, size)):
        out.append(
            audio_frame(
                signal[begin : begin + size],
                pts_ns=start_ns + begin * 62_500,
                seq=index,
                stream_id="a",
                sample_rate_hz=16000,
            )
        )
    return out


async def test_mfcc_stage_emits_timestamped_blocks_equal_to_batch(real_speech: np.ndarray) -> None:
    from engine.core.stage import run_stage

    signal = real_speech[:32000]
    out = await run_stage(MfccStage(), chunks_of(signal, 700, start_ns=5_000_000))
    blocks = [b for b in out if isinstance(b, MfccBlock)]
    features = np.concatenate([b.features for b in blocks])
    assert np.array_equal(features, mfcc(signal, 16000))
    for block in blocks:
        assert block.pts_ns == 5_000_000 + block.first_index * 10_000_000


async def test_mfcc_stage_restarts_at_gaps_and_timestamp_jumps(real_speech: np.ndarray) -> None:
    from engine.core.stage import run_stage

    frames = chunks_of(real_speech[:8000], 800)
    later = chunks_of(real_speech[8000:16000], 800, start_ns=2_000_000_000)
    gap = merge_gap(None, frames[-1])
    out = await run_stage(MfccStage(), [*frames[:-1], gap, *later])
    blocks = [b for b in out if isinstance(b, MfccBlock)]
    starts = {b.pts_ns - b.first_index * b.hop_ns for b in blocks}
    assert starts == {0, 2_000_000_000}
    second = np.concatenate([b.features for b in blocks if b.pts_ns >= 2_000_000_000])
    assert np.array_equal(second, mfcc(real_speech[8000:16000], 16000))


def test_demo_clip_ships_in_the_package(demo: Path) -> None:
    assert demo.is_file() and demo.stat().st_size > 100_000
    assert (demo.parent / "ATTRIBUTION.md").is_file()
