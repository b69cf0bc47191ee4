"""The live model's pieces compute what the whole-sequence torch models compute."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.core.errors import WeightsError
from engine.models.light_asd import (
    StreamingVisualEncoder,
    VisualEncoder,
    load_light_asd_backend,
    load_light_asd_encoders,
    streaming_state_size,
)
from engine.models.live import DELAY_FRAMES, LIVE_WEIGHTS_DIR, STEP_FRAMES, load_live_weights
from engine.models.syncnet_lite import SyncNetLiteModel
from engine.runtime.backends import OnnxBackend
from tests.conftest import SHARED

LIGHT_ASD = SHARED / "models" / "light-asd" / "finetuning_TalkSet.model"


def _visual() -> VisualEncoder:
    if not LIGHT_ASD.exists():
        pytest.skip("Light-ASD checkpoint not in ../shared")
    visual, _ = load_light_asd_encoders(LIGHT_ASD)
    return visual.eval()


def _stream(step_fn, faces: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    state = np.zeros((1, streaming_state_size()), dtype=np.float32)
    features = []
    for start in range(0, faces.shape[1], STEP_FRAMES):
        out = step_fn(faces[:, start : start + STEP_FRAMES], state)
        features.append(out[:, : STEP_FRAMES * 128].reshape(STEP_FRAMES, 128))
        state = out[:, STEP_FRAMES * 128 :]
    return np.concatenate(features)[DELAY_FRAMES:]


def test_streaming_encoder_equals_the_whole_sequence_encoder() -> None:
    visual = _visual()
    faces = np.random.default_rng(0).random((1, 30, 112, 112), dtype=np.float32)
    with torch.no_grad():
        whole = visual(torch.from_numpy(faces))[0].numpy()
        step = StreamingVisualEncoder(visual, STEP_FRAMES).eval()
        streamed = _stream(
            lambda f, s: step(torch.from_numpy(f), torch.from_numpy(s)).numpy(), faces
        )
    assert streamed.shape == (24, 128)
    np.testing.assert_allclose(streamed, whole[:24], atol=1e-4)


def test_shipped_visual_step_graph_matches_torch() -> None:
    visual = _visual()
    weights = load_live_weights()
    backend = OnnxBackend(weights.visual_step, providers="cpu")
    faces = np.random.default_rng(1).random((1, 20, 112, 112), dtype=np.float32)
    with torch.no_grad():
        whole = visual(torch.from_numpy(faces))[0].numpy()
    streamed = _stream(lambda f, s: backend.run({"faces": f, "state": s}), faces)
    np.testing.assert_allclose(streamed, whole[:14], atol=1e-4)


def test_numpy_heads_match_the_torch_modules() -> None:
    if not LIGHT_ASD.exists():
        pytest.skip("Light-ASD checkpoint not in ../shared")
    weights = load_live_weights()
    rng = np.random.default_rng(2)
    audio, visual = (rng.random((40, 128), dtype=np.float32) for _ in range(2))
    backend = load_light_asd_backend(LIGHT_ASD)
    lite = SyncNetLiteModel()
    lite.load_state_dict(
        torch.load(LIVE_WEIGHTS_DIR.parent / "syncnet_lite" / "syncnet_lite.pt", weights_only=True)
    )
    lite.eval()
    with torch.no_grad():
        logits = backend(torch.from_numpy(audio)[None], torch.from_numpy(visual)[None])[0]
        expected = torch.softmax(logits, dim=1)[:, 1].numpy()
        video_emb = lite.video_head(torch.from_numpy(visual)[None])[0].numpy()
        audio_emb = lite.audio_head(torch.from_numpy(audio)[None])[0].numpy()
    np.testing.assert_allclose(weights.asd(audio, visual), expected, atol=1e-4)
    np.testing.assert_allclose(weights.video_head(visual), video_emb, atol=1e-4)
    np.testing.assert_allclose(weights.audio_head(audio), audio_emb, atol=1e-4)


def test_an_incomplete_live_folder_is_a_weights_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(WeightsError, match="missing"):
        load_live_weights(tmp_path)
