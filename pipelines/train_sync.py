"""Train SyncNet-lite's sync heads on cached clips: which of 31 audio windows fits these lips?

Self-supervised, as SyncNet: the genuine pair is a 5-frame window of a face track and the 20 MFCC
steps at the same time; the negatives are the same clip's audio shifted by -15..+15 frames (the
shifts the analysis searches) and audio windows of other clips. The loss is a softmax over all
candidates (cross-entropy on scaled cosine similarities), which ranks the true shift first,
what the offset estimate needs, rather than SyncNet's pairwise contrastive margin.

The encoders are Light-ASD's (``--light-asd CHECKPOINT``, MIT) and stay frozen: their per-frame
features are computed once per clip, so training the heads takes minutes on a CPU. Features get
Gaussian noise and dropout as augmentation. The model is selected on held-out *train*
identities (every ``--val-every``-th); the test split is never read here.

Deterministic given ``--seed`` (one process, fixed threads). Writes ``syncnet_lite.pt`` (the
whole model's state dict), ``video.onnx`` / ``audio.onnx`` and ``training.json`` to ``--out``.
Run: ``python -m pipelines.train_sync --cache CACHE --light-asd CHECKPOINT --out OUT``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F  # noqa: N812
from numpy.lib.stride_tricks import sliding_window_view

from engine.analysis.windows import longest_run, pair_windows
from engine.models.light_asd import AudioEncoder, VisualEncoder, load_light_asd_encoders
from engine.models.syncnet_lite import WINDOW_FRAMES, SyncNetLiteModel
from pipelines.sync_data import CachedClip, load_split

SHIFTS = 15
"""Candidate shifts -15..+15 frames, as the offset search."""
FOREIGN = 32
"""Audio windows from other clips added as negatives per sample."""
ENCODER_CHUNK = 192
"""Frames per visual-encoder call when computing features (bounded memory)."""
ENCODER_REACH = 8
"""Frames of overlap between encoder calls: more than the encoders' ±6-frame reach."""


@dataclass
class EncodedClip:
    """Frozen encoder features of one clip's longest run of paired windows.

    ``video[t]`` is frame ``t`` of the run; ``audio[offset + t]`` is the 40 ms of sound that
    starts with frame ``t``, and audio features exist before and after the run where the MFCC
    does, so shifted windows read real sound.
    """

    name: str
    identity: str
    video: npt.NDArray[np.float32]  # (frames, 128)
    audio: npt.NDArray[np.float32]  # (audio frames, 128)
    offset: int

    def windows(self) -> npt.NDArray[np.int64]:
        """Run windows whose 31 shifted audio windows all exist."""
        t = np.arange(self.video.shape[0] - WINDOW_FRAMES + 1)
        low = self.offset + t - SHIFTS
        high = self.offset + t + SHIFTS + WINDOW_FRAMES
        return t[(low >= 0) & (high <= self.audio.shape[0])]


def visual_features(
    encoder: VisualEncoder, faces: npt.NDArray[np.uint8]
) -> npt.NDArray[np.float32]:
    """Per-frame features of a whole run, in overlapping chunks (equal to one call on it all)."""
    parts = []
    with torch.inference_mode():
        for start in range(0, faces.shape[0], ENCODER_CHUNK):
            low = max(0, start - ENCODER_REACH)
            high = min(faces.shape[0], start + ENCODER_CHUNK + ENCODER_REACH)
            chunk = torch.from_numpy(faces[low:high] / np.float32(255))[None]
            out = encoder(chunk)[0]
            parts.append(
                out[start - low : start - low + min(ENCODER_CHUNK, faces.shape[0] - start)]
            )
    return torch.cat(parts).numpy()


def clip_features(
    clip: CachedClip, visual: VisualEncoder, audio: AudioEncoder
) -> EncodedClip | None:
    """Encoder features of the clip's longest run of windows with audio; None when too short."""
    paired = pair_windows(clip.pts_ns, clip.mfcc, clip.mfcc_start_ns)
    run = longest_run(paired.starts, paired.pts_ns)
    starts, steps = paired.starts[run], paired.steps[run]
    if starts.size < WINDOW_FRAMES:
        return None
    first, last = int(starts[0]), int(starts[-1]) + WINDOW_FRAMES
    phase = int(steps[0]) % 4  # audio features every 4 steps, in phase with the frames
    mfcc = torch.from_numpy(np.ascontiguousarray(clip.mfcc[phase:].T))[None, None]
    with torch.inference_mode():
        sound = audio(mfcc)[0].numpy()
    return EncodedClip(
        name=clip.name,
        identity=clip.identity,
        video=visual_features(visual, clip.face112[first:last]),
        audio=sound,
        offset=(int(steps[0]) - phase) // 4,
    )


class Sampler:
    """Training batches: video windows, their 31 shifted audio windows, foreign audio windows."""

    def __init__(self, clips: list[EncodedClip], seed: int) -> None:
        self.clips = clips
        self.rng = np.random.default_rng(seed)
        self.video = [sliding_window_view(c.video, WINDOW_FRAMES, axis=0) for c in clips]
        self.audio = [sliding_window_view(c.audio, WINDOW_FRAMES, axis=0) for c in clips]
        self.index = [(i, int(t)) for i, c in enumerate(clips) for t in c.windows()]
        owners = [np.full(a.shape[0], i) for i, a in enumerate(self.audio)]
        self.pool = np.concatenate(self.audio)  # every audio window: (n, 128, 5)
        self.pool_owner = np.concatenate(owners)

    def __len__(self) -> int:
        return len(self.index)

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``video (B, 5, 128)`` and ``audio (B, 31 + FOREIGN, 5, 128)`` features."""
        picks = [self.index[k] for k in self.rng.integers(len(self.index), size=size)]
        video = np.stack([self.video[i][t] for i, t in picks])
        own = np.stack(
            [self.audio[i][self.clips[i].offset + t - SHIFTS :][: 2 * SHIFTS + 1] for i, t in picks]
        )
        foreign = self.rng.integers(self.pool.shape[0], size=(size, FOREIGN))
        clash = self.pool_owner[foreign] == np.array([i for i, _ in picks])[:, None]
        foreign[clash] = (foreign[clash] + self.pool.shape[0] // 2) % self.pool.shape[0]
        audio = np.concatenate([own, self.pool[foreign]], axis=1)
        return (
            torch.from_numpy(video).transpose(1, 2),
            torch.from_numpy(np.ascontiguousarray(audio)).transpose(2, 3),
        )


def augment(features: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise at a tenth of the features' spread, and 10 % feature dropout."""
    noise = torch.randn(features.shape, generator=generator) * (0.1 * features.std())
    keep = torch.rand(features.shape, generator=generator) >= 0.1
    return (features + noise) * keep / 0.9


def loss_and_accuracy(
    model: SyncNetLiteModel, video: torch.Tensor, audio: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """Softmax over candidates; the true one is the unshifted window (index SHIFTS)."""
    size, candidates = audio.shape[:2]
    v = model.video_head(video)[:, 0]  # (B, dim): one window of 5 features
    a = model.audio_head(audio.flatten(0, 1))[:, 0].view(size, candidates, -1)
    logits = scale * torch.einsum("bd,bcd->bc", v, a)
    target = torch.full((size,), SHIFTS, dtype=torch.long)
    loss = F.cross_entropy(logits, target)
    accuracy = float((logits.argmax(1) == target).float().mean())
    return loss, accuracy


def evaluate(model: SyncNetLiteModel, clips: list[EncodedClip], span: int = 25) -> dict[str, float]:
    """Share of ``span``-window stretches whose mean-distance offset is exact / within ±1."""
    model.eval()
    exact = near = total = 0
    with torch.inference_mode():
        for clip in clips:
            t = clip.windows()
            if t.size < span:
                continue
            v = model.video_head(torch.from_numpy(clip.video)[None])[0]
            a = model.audio_head(torch.from_numpy(clip.audio)[None])[0]
            index = torch.from_numpy(clip.offset + t)[:, None] + torch.arange(-SHIFTS, SHIFTS + 1)
            dist = (v[torch.from_numpy(t)][:, None, :] - a[index]).norm(dim=2)
            for start in range(0, t.size - span + 1, span):
                best = int(dist[start : start + span].mean(0).argmin()) - SHIFTS
                exact += best == 0
                near += abs(best) <= 1
                total += 1
    model.train()
    return {"exact": exact / max(total, 1), "within_1": near / max(total, 1), "spans": total}


def validation_identities(identities: list[str], every: int) -> set[str]:
    """Every ``every``-th train identity (sorted): held out for model selection, never the test."""
    return set(identities[::every])


def freeze_encoders(model: SyncNetLiteModel) -> None:
    """Encoders in eval mode with no gradients: only the heads learn."""
    for encoder in (model.visual, model.audio):
        encoder.eval()
        for parameter in encoder.parameters():
            parameter.requires_grad_(False)


def fit_heads(
    model: SyncNetLiteModel,
    sampler: Sampler,
    val_clips: list[EncodedClip],
    args: argparse.Namespace,
    started: float,
) -> tuple[list[dict[str, float]], float]:
    """Train the heads; leave ``model`` with the state that scored best on ``val_clips``.

    Returns the validation history and the best 1 s within-±1 share. Deterministic given
    ``args.seed`` and torch's global generator (dropout draws from it).
    """
    generator = torch.Generator().manual_seed(args.seed)
    heads = [*model.video_head.parameters(), *model.audio_head.parameters()]
    scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
    optimiser = torch.optim.AdamW([*heads, scale], lr=args.lr, weight_decay=args.weight_decay)
    history: list[dict[str, float]] = []
    best, best_state = -1.0, None
    losses: list[float] = []
    accuracies: list[float] = []
    for step in range(1, args.steps + 1):
        video, audio = sampler.batch(args.batch)
        video = augment(video, generator)
        audio = augment(audio, generator)
        loss, accuracy = loss_and_accuracy(model, video, audio, scale.exp())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
        accuracies.append(accuracy)
        if step % args.eval_every == 0 or step == args.steps:
            held = evaluate(model, val_clips)
            record = {
                "step": step,
                "loss": float(np.mean(losses)),
                "train_top1": float(np.mean(accuracies)),
                "val_1s_exact": held["exact"],
                "val_1s_within_1": held["within_1"],
                "val_spans": held["spans"],
                "seconds": time.perf_counter() - started,
            }
            losses, accuracies = [], []
            history.append(record)
            print(json.dumps(record), flush=True)
            if held["within_1"] > best:
                best = held["within_1"]
                best_state = {k: v.clone() for k, v in model.state_dict().items()}
    if best_state is not None:
        model.load_state_dict(best_state)
    return history, best


def train(args: argparse.Namespace) -> dict[str, object]:
    """Compute features, train the heads, keep the best on held-out train identities, export."""
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    model = SyncNetLiteModel()
    model.visual, model.audio = load_light_asd_encoders(args.light_asd)
    freeze_encoders(model)
    started = time.perf_counter()
    cached = load_split(args.cache, "train")
    features = [f for c in cached if (f := clip_features(c, model.visual, model.audio))]
    print(f"features of {len(features)} clips in {time.perf_counter() - started:.0f} s", flush=True)
    held_out = validation_identities(sorted({f.identity for f in features}), args.val_every)
    train_clips = [f for f in features if f.identity not in held_out and f.windows().size]
    val_clips = [f for f in features if f.identity in held_out]
    sampler = Sampler(train_clips, args.seed)
    print(
        f"train: {len(train_clips)} clips, {len(sampler)} windows; "
        f"validation: {len(val_clips)} clips of {len(held_out)} train identities",
        flush=True,
    )
    history, best = fit_heads(model, sampler, val_clips, args, started)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out / "syncnet_lite.pt")
    export(model, args.out)
    summary = {
        "seed": args.seed,
        "steps": args.steps,
        "light_asd": Path(args.light_asd).name,
        "train_clips": [c.name for c in train_clips],
        "validation_clips": [c.name for c in val_clips],
        "history": history,
        "best_val_1s_within_1": best,
    }
    (args.out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def export(model: SyncNetLiteModel, out: Path) -> None:
    """``video.onnx`` and ``audio.onnx`` in ``out``."""
    from engine.models.export import export_towers
    from engine.models.spec import SYNCNET_LITE

    paths = export_towers(model, SYNCNET_LITE, out)
    for tower, path in paths.items():
        path.replace(out / f"{tower}.onnx")


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--cache", type=Path, required=True, help="from pipelines.sync_data")
    parser.add_argument("--light-asd", type=Path, required=True, help="Light-ASD .model file")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument(
        "--val-every", type=int, default=6, help="every n-th train identity validates"
    )
    args = parser.parse_args(argv)
    if not args.light_asd.is_file():
        print(f"no Light-ASD checkpoint at {args.light_asd}", file=sys.stderr)
        return 2
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
