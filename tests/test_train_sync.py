"""Training SyncNet-lite's heads is deterministic given the seed, and it learns."""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from engine.models.syncnet_lite import SyncNetLiteModel
from pipelines.train_sync import EncodedClip, Sampler, evaluate, fit_heads


def synthetic_clips(count: int, seed: int) -> list[EncodedClip]:
    """Clips whose audio features are their video features plus noise: a learnable sync."""
    rng = np.random.default_rng(seed)
    clips = []
    for index in range(count):
        video = rng.standard_normal((120, 128)).astype(np.float32)
        audio = np.concatenate(
            [rng.standard_normal((20, 128)), video + 0.3 * rng.standard_normal(video.shape)]
        ).astype(np.float32)
        clips.append(EncodedClip(f"clip{index}", f"id{index}", video, audio, offset=20))
    return clips


def run(seed: int, steps: int) -> tuple[SyncNetLiteModel, list[dict[str, float]]]:
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    model = SyncNetLiteModel()
    args = argparse.Namespace(
        seed=seed, steps=steps, batch=16, lr=3e-3, weight_decay=1e-2, eval_every=steps
    )
    history, _ = fit_heads(
        model,
        Sampler(synthetic_clips(4, 0), seed),
        synthetic_clips(2, 1),
        args,
        time.perf_counter(),
    )
    return model, history


def test_same_seed_same_weights_and_another_seed_differs() -> None:
    first, _ = run(0, 6)
    second, _ = run(0, 6)
    third, _ = run(1, 6)
    for name, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[name]), name
    assert not torch.equal(first.video_head.window.weight, third.video_head.window.weight)


def test_the_heads_learn_a_sync_that_is_in_the_features() -> None:
    model, history = run(0, 120)
    held = evaluate(model, synthetic_clips(2, 2))
    assert held["within_1"] >= 0.9, (held, history)
