"""The Light-ASD encoders load the published MIT checkpoints from ../shared/models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engine.core.errors import WeightsError
from engine.models.light_asd import load_light_asd_encoders
from tests.conftest import SHARED

CHECKPOINTS = [
    SHARED / "models" / "light-asd" / "finetuning_TalkSet.model",
    SHARED / "models" / "light-asd" / "pretrain_AVA_CVPR.model",
]


@pytest.mark.parametrize("path", CHECKPOINTS, ids=lambda p: p.name)
def test_published_checkpoints_load_and_give_one_feature_per_frame(path: Path) -> None:
    if not path.is_file():
        pytest.skip(f"shared models not found: {path}")
    visual, audio = load_light_asd_encoders(path)
    visual.eval()
    audio.eval()
    rng = np.random.default_rng(0)
    with torch.inference_mode():
        v = visual(torch.from_numpy(rng.random((2, 9, 112, 112), dtype=np.float32)))
        a = audio(torch.from_numpy(rng.standard_normal((2, 1, 13, 36)).astype(np.float32)))
    assert v.shape == (2, 9, 128) and a.shape == (2, 9, 128)
    assert torch.isfinite(v).all() and torch.isfinite(a).all()
    assert float(v.std()) > 0 and float(a.std()) > 0


def test_a_file_that_is_not_a_checkpoint_is_a_weights_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="not a readable Light-ASD checkpoint"):
        load_light_asd_encoders(bad)
    wrong = tmp_path / "wrong.model"
    torch.save({"model.visualEncoder.block1.s_3.weight": torch.zeros(3)}, wrong)
    with pytest.raises(WeightsError, match="does not match Light-ASD"):
        load_light_asd_encoders(wrong)
