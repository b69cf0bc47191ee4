"""Train SyncNet-lite on the cached clips: which of 31 audio windows belongs to these lips?

Self-supervised, as SyncNet: the genuine pair is a 5-frame mouth window and the 20 MFCC steps at
the same time; the negatives are the same clip's audio shifted by -15..+15 frames (the shifts
the analysis searches) and audio windows of other clips. The loss is a softmax over all
candidates (cross-entropy on scaled cosine similarities), which ranks the true shift first —
what the offset estimate needs — rather than SyncNet's pairwise contrastive margin.

Augmentation fights the small data: brightness, contrast, a small shift and scale of the mouth
crop, horizontal flips, pixel noise; MFCC noise, gain (c0) and time masking.

Deterministic given ``--seed`` (one process, fixed threads). Run:
``python -m pipelines.train_sync --cache CACHE --out OUT [--epochs N] [--seed S]``.
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

from engine.analysis.windows import longest_run, pair_windows, video_windows
from engine.models.syncnet_lite import SyncNetLiteModel
from pipelines.sync_data import CachedClip, load_split

SHIFTS = 15
"""Candidate shifts -15..+15 frames, as the offset search."""
FOREIGN = 16
"""Audio windows from other clips added as negatives per sample."""


@dataclass
class Windows:
    """All training windows of one clip: mouth windows and, per window, 31 shifted audio windows."""

    name: str
    mouth: npt.NDArray[np.uint8]  # (n, 5, 48, 96)
    audio: npt.NDArray[np.float32]  # (n + 2 * SHIFTS, 13, 20): window k pairs with audio k+SHIFTS


def clip_windows(clip: CachedClip) -> Windows | None:
    """Windows whose 31 shifted audio windows all lie inside the clip."""
    paired = pair_windows(clip.pts_ns, clip.mfcc, clip.mfcc_start_ns)
    run = longest_run(paired.starts, paired.pts_ns)
    starts, audio = paired.starts[run], paired.audio[run]
    if starts.size < 2 * SHIFTS + 5:
        return None
    mouth = video_windows(clip.mouth, starts[SHIFTS:-SHIFTS])
    return Windows(clip.name, mouth, audio)


def augment_video(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random brightness/contrast, shift/scale, flip and noise on ``(B, 5, 48, 96)`` in [0, 1]."""
    size = batch.shape[0]
    gain = 1 + 0.3 * (torch.rand(size, 1, 1, 1, generator=generator) - 0.5)
    bias = 0.15 * (torch.rand(size, 1, 1, 1, generator=generator) - 0.5)
    out = batch * gain + bias
    scale = 1 + 0.16 * (torch.rand(size, generator=generator) - 0.5)
    shift = 0.12 * (torch.rand(size, 2, generator=generator) - 0.5)
    theta = torch.zeros(size, 2, 3)
    theta[:, 0, 0] = scale
    theta[:, 1, 1] = scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(out.shape), align_corners=False)
    out = F.grid_sample(out, grid, padding_mode="border", align_corners=False)
    flip = torch.rand(size, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    out = out + 0.02 * torch.randn(out.shape, generator=generator)
    return out.clamp(0, 1)


def augment_audio(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """MFCC noise, gain (c0 offset) and one masked time step range on ``(B, 1, 13, 20)``."""
    size = batch.shape[0]
    out = batch + 0.5 * torch.randn(batch.shape, generator=generator)
    out[:, :, 0, :] += 4 * (torch.rand(size, 1, 1, generator=generator) - 0.5)
    start = torch.randint(0, 18, (size,), generator=generator)
    width = torch.randint(0, 3, (size,), generator=generator)
    steps = torch.arange(20)
    mask = (steps[None, :] >= start[:, None]) & (steps[None, :] < (start + width)[:, None])
    return out.masked_fill(mask[:, None, None, :], 0.0)


class Sampler:
    """Draws training batches: mouth windows, 31 shifted audio windows, foreign audio windows."""

    def __init__(self, clips: list[Windows], seed: int) -> None:
        """Index every window of every clip."""
        self.clips = clips
        self.rng = np.random.default_rng(seed)
        self.index = [(c, k) for c, w in enumerate(clips) for k in range(w.mouth.shape[0])]

    def __len__(self) -> int:
        """Windows in one epoch."""
        return len(self.index)

    def epoch(self, batch: int) -> list[list[tuple[int, int]]]:
        """The batches of one epoch, shuffled."""
        order = self.rng.permutation(len(self.index))
        picks = [self.index[i] for i in order]
        return [picks[i : i + batch] for i in range(0, len(picks) - batch + 1, batch)]

    def tensors(self, picks: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """``video (B, 5, 48, 96)`` in [0, 1] and ``audio (B, 31 + FOREIGN, 1, 13, 20)``."""
        video = np.stack([self.clips[c].mouth[k] for c, k in picks]).astype(np.float32) / 255
        audio = []
        for c, k in picks:
            own = self.clips[c].audio[k : k + 2 * SHIFTS + 1]
            others = [o for o in range(len(self.clips)) if o != c]
            foreign = []
            for o in self.rng.choice(others, FOREIGN):
                windows = self.clips[int(o)].audio
                foreign.append(windows[self.rng.integers(windows.shape[0])])
            audio.append(np.concatenate([own, np.stack(foreign)]))
        return torch.from_numpy(video), torch.from_numpy(np.stack(audio))[:, :, None]


def loss_and_accuracy(
    model: SyncNetLiteModel, video: torch.Tensor, audio: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """Softmax over candidates; the true one is the unshifted window (index SHIFTS)."""
    size, candidates = audio.shape[:2]
    v = F.normalize(model.forward_video(video), dim=1)
    a = F.normalize(model.forward_audio(audio.flatten(0, 1)), dim=1).view(size, candidates, -1)
    logits = scale * torch.einsum("bd,bcd->bc", v, a)
    target = torch.full((size,), SHIFTS, dtype=torch.long)
    loss = F.cross_entropy(logits, target)
    accuracy = float((logits.argmax(1) == target).float().mean())
    return loss, accuracy


def evaluate(model: SyncNetLiteModel, clips: list[Windows], window: int = 25) -> dict[str, float]:
    """Share of ``window``-frame spans whose mean-distance offset is exact / within ±1 frame."""
    model.eval()
    exact = near = total = 0
    with torch.inference_mode():
        for clip in clips:
            v = F.normalize(
                model.forward_video(torch.from_numpy(clip.mouth / np.float32(255))), dim=1
            )
            a = F.normalize(model.forward_audio(torch.from_numpy(clip.audio)[:, None]), dim=1)
            n = v.shape[0]
            # distance of window k to audio window k + SHIFTS + s, for s in -SHIFTS..SHIFTS
            index = torch.arange(n)[:, None] + torch.arange(2 * SHIFTS + 1)[None, :]
            dist = (v[:, None, :] - a[index]).norm(dim=2)  # (n, 31)
            for start in range(0, n - window + 1, window):
                best = int(dist[start : start + window].mean(0).argmin()) - SHIFTS
                exact += best == 0
                near += abs(best) <= 1
                total += 1
    model.train()
    return {"exact": exact / max(total, 1), "within_1": near / max(total, 1), "spans": total}


def validation_identities(identities: list[str], every: int) -> set[str]:
    """Every ``every``-th train identity (sorted): held out for model selection, never the test."""
    return set(identities[::every])


def train(args: argparse.Namespace) -> dict[str, object]:
    """Train; select on held-out *train* identities (the test split is only for the report)."""
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)
    cached = load_split(args.cache, "train")
    held_out = validation_identities(sorted({c.identity for c in cached}), args.val_every)
    train_clips = [w for c in cached if c.identity not in held_out if (w := clip_windows(c))]
    val_clips = [w for c in cached if c.identity in held_out if (w := clip_windows(c))]
    sampler = Sampler(train_clips, args.seed)
    print(
        f"train: {len(train_clips)} clips, {len(sampler)} windows; "
        f"validation: {len(val_clips)} clips of {len(held_out)} train identities"
    )
    model = SyncNetLiteModel()
    scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
    params = [*model.parameters(), scale]
    optimiser = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * (len(sampler) // args.batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, args.lr, total_steps=max(steps, 1))
    history: list[dict[str, float]] = []
    best = -1.0
    args.out.mkdir(parents=True, exist_ok=True)
    for epoch in range(args.epochs):
        started, losses, accs = time.perf_counter(), [], []
        for picks in sampler.epoch(args.batch):
            video, audio = sampler.tensors(picks)
            video = augment_video(video, generator)
            audio = augment_audio(audio.flatten(0, 1), generator).view(audio.shape)
            loss, acc = loss_and_accuracy(model, video, audio, scale.exp())
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            losses.append(float(loss))
            accs.append(acc)
        held = evaluate(model, val_clips)
        record = {
            "epoch": epoch + 1,
            "loss": float(np.mean(losses)),
            "train_top1": float(np.mean(accs)),
            "val_1s_exact": held["exact"],
            "val_1s_within_1": held["within_1"],
            "seconds": time.perf_counter() - started,
        }
        history.append(record)
        print(json.dumps(record), flush=True)
        if held["within_1"] >= best:
            best = held["within_1"]
            torch.save(model.state_dict(), args.out / "syncnet_lite.pt")
    summary = {"seed": args.seed, "epochs": args.epochs, "history": history, "best": best}
    (args.out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--val-every", type=int, default=6, help="every n-th train identity validates"
    )
    args = parser.parse_args(argv)
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
