"""``talkscope train pins``: train the PINs heads on the train identities and ship the towers.

1. Data: :func:`pipelines.pins_data.prepare_all` on the ``train`` split (cached), speaking tracks
   only.
2. Trunk embeddings: the frozen SFace and resemblyzer encoders, run as the assembled towers.
3. Heads: face and voice :class:`~engine.models.pins.Head`, contrastive loss with margin, negatives
   mined in the mini-batch by the paper's curriculum (no identity labels: two tracks of one person
   in a batch count as different, as in the paper). Three mining schedules are compared by 4-fold
   cross-validation over train identities (random, hardest, curriculum); the curriculum is the
   one shipped.
4. Calibration, on train only: Platt scaling of the voice-face cosine (out-of-fold scores), and
   the face and voice re-identification thresholds of the identity engine.
5. From scratch (the paper's other initialisation): :class:`~engine.models.pins.ScratchFaceNet` and
   :class:`~engine.models.pins.ScratchVoiceNet` trained with the same loss for a time budget; kept
   in the cache for the benchmark, not shipped.

Writes ``face.onnx``, ``voice.onnx``, ``calibration.json`` and ``training.json`` to ``--out``
(default: the package's ``engine/models/weights/pins``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from engine.core.errors import UsageError
from engine.identity.engine import unit
from engine.identity.scoring import eer, roc_auc
from engine.identity.voice import normalize_bins, slaney_mel_filterbank
from engine.models.pins import (
    FACE_TOWER,
    FACE_TRUNK_SIZE,
    TOWERS,
    VOICE_TOWER,
    VOICE_TRUNK_SIZE,
    Head,
    Modality,
    ScratchFaceNet,
    ScratchVoiceNet,
    contrastive_loss,
    curriculum_negatives,
    ranged_negatives,
)
from pipelines.pins_data import IdentityTrack, prepare_all

TRUNK_FILES: dict[Modality, Path] = {
    "face": Path("sface") / "face_recognition_sface_2021dec_int8bq.fixed.onnx",
    "voice": Path("resemblyzer") / "resemblyzer_encoder.onnx",
}
MARGIN = 1.0
SCHEDULES = ("random", "hardest", "curriculum", "curriculum-range")
TAU_START = 0.0
TAU_END = 0.8
RANGE_START = 0.5


@dataclass
class TrunkTrack:
    """One track's frozen-trunk embeddings: faces ``(n, 128)``, voices ``(segments, 3, 256)``."""

    identity: str
    clip: str
    faces: npt.NDArray[np.float32]
    voices: npt.NDArray[np.float32]


@dataclass(frozen=True)
class TrainConfig:
    """Head training settings."""

    steps: int = 1500
    batch: int = 24
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0


def tau_at(schedule: str, step: int, steps: int) -> float | None:
    """Difficulty at ``step``.

    - ``random``: None, a uniformly random negative;
    - ``hardest``: 1, the nearest negative;
    - ``curriculum`` (the paper's): the negative at rank ``tau`` from easy to hard, ``tau``
      rising linearly from :data:`TAU_START` to :data:`TAU_END` over the first 80% of steps;
    - ``curriculum-range``: a random negative among the easiest ``tau`` share, ``tau`` rising
      from :data:`RANGE_START` to 1 over the first 80% of steps.
    """
    progress = min(1.0, step / max(1, int(0.8 * steps)))
    if schedule == "random":
        return None
    if schedule == "hardest":
        return 1.0
    if schedule == "curriculum-range":
        return RANGE_START + (1.0 - RANGE_START) * progress
    return TAU_START + (TAU_END - TAU_START) * progress


def mine(
    schedule: str, distances: torch.Tensor, step: int, steps: int, gen: torch.Generator
) -> torch.Tensor:
    """The negative of each anchor under one schedule (see :func:`tau_at`)."""
    tau = tau_at(schedule, step, steps)
    k = distances.shape[0]
    if tau is None:
        pick = torch.randint(0, k - 1, (k,), generator=gen)
        return pick + (pick >= torch.arange(k)).long()  # any index but the anchor's own
    if schedule == "curriculum-range":
        return ranged_negatives(distances, tau, gen)
    return curriculum_negatives(distances, tau)


def trunk_embeddings(tracks: list[IdentityTrack], models: Path) -> list[TrunkTrack]:
    """Run both frozen trunks over every track (through towers with an untrained head)."""
    from engine.models.pins_export import assemble_tower
    from engine.runtime.backends import OnnxBackend

    torch.manual_seed(0)
    sessions = {
        m: OnnxBackend(
            assemble_tower(
                TOWERS[m],
                models / TRUNK_FILES[m],
                Head(FACE_TRUNK_SIZE if m == "face" else VOICE_TRUNK_SIZE).arrays(),
                slaney_mel_filterbank(),
            )
        )
        for m in ("face", "voice")
    }
    out = []
    for track in tracks:
        faces = run_batched(
            sessions["face"], FACE_TOWER.input.name, track.faces.transpose(0, 3, 1, 2)
        )
        flat = track.voices.reshape(-1, 160, 257)
        voices = run_batched(sessions["voice"], VOICE_TOWER.input.name, flat)
        out.append(
            TrunkTrack(
                identity=track.identity,
                clip=track.clip,
                faces=faces[:, 256:],
                voices=voices[:, 256:].reshape(len(track.voices), 3, -1),
            )
        )
    return out


def run_batched(
    backend: Any, name: str, items: npt.NDArray[Any], batch: int = 32
) -> npt.NDArray[np.float32]:
    """A tower over many items, ``batch`` at a time, as float32 rows."""
    rows = [
        backend.run({name: np.ascontiguousarray(items[i : i + batch], dtype=np.float32)})
        for i in range(0, len(items), batch)
    ]
    return np.concatenate(rows).astype(np.float32)


def _voice_embed(head: Head, windows: torch.Tensor) -> torch.Tensor:
    """``(batch, 3, 256)`` trunk windows -> ``(batch, 256)``: head per window, averaged."""
    b, w, d = windows.shape
    per_window = head(windows.reshape(b * w, d)).reshape(b, w, -1)
    return torch.nn.functional.normalize(per_window.mean(dim=1), dim=1)


def _sample(
    tracks: list[TrunkTrack], k: int, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    chosen = rng.choice(len(tracks), size=min(k, len(tracks)), replace=False)
    faces = [tracks[i].faces[rng.integers(len(tracks[i].faces))] for i in chosen]
    voices = [tracks[i].voices[rng.integers(len(tracks[i].voices))] for i in chosen]
    return torch.from_numpy(np.stack(faces)), torch.from_numpy(np.stack(voices))


def train_heads(
    tracks: list[TrunkTrack], schedule: str, config: TrainConfig
) -> tuple[Head, Head, list[float]]:
    """Train a face and a voice head on ``tracks`` with one negative-mining schedule."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    face_head, voice_head = Head(FACE_TRUNK_SIZE), Head(VOICE_TRUNK_SIZE)
    params = [*face_head.parameters(), *voice_head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    losses: list[float] = []
    for step in range(config.steps):
        faces, voices = _sample(tracks, config.batch, rng)
        f = face_head(faces)
        v = _voice_embed(voice_head, voices)
        distances = torch.cdist(f, v).detach()
        neg_v = mine(schedule, distances, step, config.steps, gen)
        neg_f = mine(schedule, distances.T, step, config.steps, gen)
        loss = contrastive_loss(f, v, v[neg_v], MARGIN) + contrastive_loss(v, f, f[neg_f], MARGIN)
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        losses.append(float(loss.detach()))
    face_head.eval()
    voice_head.eval()
    return face_head, voice_head, losses


def pins_scores(
    face_head: Head, voice_head: Head, tracks: list[TrunkTrack]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """Cosine of every (face frame, voice segment) pair across ``tracks``, and the labels.

    A label says whether the two are the same person.
    """
    with torch.no_grad():
        faces = [face_head(torch.from_numpy(t.faces)).numpy() for t in tracks]
        voices = [_voice_embed(voice_head, torch.from_numpy(t.voices)).numpy() for t in tracks]
    return cross_scores(faces, voices, [t.identity for t in tracks])


def cross_scores(
    faces: list[npt.NDArray[np.float32]],
    voices: list[npt.NDArray[np.float32]],
    identities: list[str],
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """Cosines of every face row against every voice row, grouped by track, and the labels."""
    scores, labels = [], []
    for i, f in enumerate(faces):
        for j, v in enumerate(voices):
            s = (f @ v.T).ravel()
            scores.append(s)
            labels.append(np.full(s.shape, identities[i] == identities[j]))
    return np.concatenate(scores).astype(np.float64), np.concatenate(labels)


def identity_folds(tracks: list[TrunkTrack], folds: int, seed: int) -> list[set[str]]:
    """Train identities split into ``folds`` groups (cross-validation by identity)."""
    names = sorted({t.identity for t in tracks})
    rng = np.random.default_rng(seed)
    rng.shuffle(names)
    return [set(names[i::folds]) for i in range(folds)]


def cross_validate(
    tracks: list[TrunkTrack], schedule: str, config: TrainConfig, folds: int = 4
) -> tuple[float, float, npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """Out-of-fold verification AUC and EER of one schedule, and the out-of-fold scores."""
    all_scores, all_labels = [], []
    for held in identity_folds(tracks, folds, config.seed):
        train = [t for t in tracks if t.identity not in held]
        val = [t for t in tracks if t.identity in held]
        face_head, voice_head, _ = train_heads(train, schedule, config)
        scores, labels = pins_scores(face_head, voice_head, val)
        all_scores.append(scores)
        all_labels.append(labels)
    scores, labels = np.concatenate(all_scores), np.concatenate(all_labels)
    return roc_auc(scores, labels), eer(scores, labels), scores, labels


def platt(scores: npt.NDArray[np.float64], labels: npt.NDArray[np.bool_]) -> tuple[float, float]:
    """Logistic calibration ``P(same) = sigmoid(a * score + b)`` (class-balanced, Newton)."""
    y = labels.astype(np.float64)
    weights = np.where(labels, 0.5 / max(1, labels.sum()), 0.5 / max(1, (~labels).sum()))
    a, b = 1.0, 0.0
    for _ in range(50):
        p = 1 / (1 + np.exp(-(a * scores + b)))
        g = weights * (p - y)
        h = weights * p * (1 - p) + 1e-9
        grad = np.array([(g * scores).sum(), g.sum()])
        hess = np.array(
            [[(h * scores**2).sum(), (h * scores).sum()], [(h * scores).sum(), h.sum()]]
        )
        step = np.linalg.solve(hess + 1e-6 * np.eye(2), grad)
        a, b = a - step[0], b - step[1]
        if np.abs(step).max() < 1e-8:
            break
    return float(a), float(b)


def reid_threshold(tracks: list[TrunkTrack], modality: Modality) -> dict[str, float]:
    """Unimodal re-identification statistics on train and the threshold the engine uses.

    Compares track means (faces) or segments (voices) of different clips: the threshold is
    halfway between the largest different-person score and the 1st percentile of same-person
    scores when they separate, else the higher of the equal-error point and the 99th percentile
    of different-person scores (at most 1% false accepts); reported with both ends.
    """
    vectors, owners = [], []
    for t in tracks:
        rows = t.faces if modality == "face" else unit(t.voices.mean(axis=1))
        for chunk in np.array_split(rows, max(1, len(rows) // 10)):
            vectors.append(unit(chunk.mean(axis=0, keepdims=True))[0])
            owners.append((t.identity, t.clip))
    matrix = np.stack(vectors)
    scores = matrix @ matrix.T
    same: list[float] = []
    diff: list[float] = []
    for i in range(len(owners)):
        for j in range(i + 1, len(owners)):
            (same if owners[i][0] == owners[j][0] else diff).append(scores[i, j])
    same_a, diff_a = np.array(same), np.array(diff)
    high_diff, low_same = float(diff_a.max()), float(np.percentile(same_a, 1))
    labels = np.concatenate([np.ones(len(same_a), bool), np.zeros(len(diff_a), bool)])
    joined = np.concatenate([same_a, diff_a])
    if low_same > high_diff:
        threshold = (high_diff + low_same) / 2
    else:  # overlapping: accept at most 1% of different-person pairs
        threshold = max(_eer_threshold(joined, labels), float(np.percentile(diff_a, 99)))
    return {
        "threshold": round(threshold, 4),
        "same_p1": round(low_same, 4),
        "same_mean": round(float(same_a.mean()), 4),
        "different_max": round(high_diff, 4),
        "different_p99": round(float(np.percentile(diff_a, 99)), 4),
        "different_mean": round(float(diff_a.mean()), 4),
        "eer": round(eer(joined, labels), 4),
    }


def voice_platt(tracks: list[TrunkTrack]) -> dict[str, Any]:
    """Platt calibration of the voice-voice cosine: 3 s segments of one person vs of others."""
    vectors = [unit(t.voices.mean(axis=1)) for t in tracks]
    owners = [t.identity for t in tracks]
    scores: list[npt.NDArray[np.float64]] = []
    labels: list[npt.NDArray[np.bool_]] = []
    for i, first in enumerate(vectors):
        for j, second in enumerate(vectors):
            if j < i:
                continue
            pair = (first @ second.T).astype(np.float64)
            if i == j:
                pair = pair[np.triu_indices(len(first), k=1)]
            scores.append(pair.ravel())
            labels.append(np.full(pair.size, owners[i] == owners[j]))
    joined, same = np.concatenate(scores), np.concatenate(labels)
    slope, intercept = platt(joined, same)
    return {
        "a": round(slope, 4),
        "b": round(intercept, 4),
        "fitted_on": "resemblyzer cosines of 3 s segments, train identities",
        "auc": round(roc_auc(joined, same), 4),
    }


def _eer_threshold(scores: npt.NDArray[np.float64], labels: npt.NDArray[np.bool_]) -> float:
    best, where = math.inf, 0.0
    for t in np.unique(np.round(scores, 3)):
        far = float((scores[~labels] >= t).mean())
        frr = float((scores[labels] < t).mean())
        if abs(far - frr) < best:
            best, where = abs(far - frr), float(t)
    return where


def train_scratch(
    tracks: list[IdentityTrack], seconds: float, seed: int
) -> tuple[ScratchFaceNet, ScratchVoiceNet, dict[str, Any]]:
    """The from-scratch networks, curriculum negatives, trained for ``seconds`` of CPU time."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    face_net, voice_net = ScratchFaceNet(), ScratchVoiceNet()
    params = [*face_net.parameters(), *voice_net.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
    start, step, budget_steps, losses = time.monotonic(), 0, 10_000, []
    while time.monotonic() - start < seconds and step < budget_steps:
        chosen = rng.choice(len(tracks), size=min(16, len(tracks)), replace=False)
        faces = np.stack([_augment_face(tracks[i].faces, rng) for i in chosen])
        voices = np.stack(
            [scratch_voice(tracks[i].voices[rng.integers(len(tracks[i].voices))]) for i in chosen]
        )
        f = face_net(torch.from_numpy(faces).float().permute(0, 3, 1, 2))
        v = voice_net(torch.from_numpy(voices))
        distances = torch.cdist(f, v).detach()
        tau = RANGE_START + (1 - RANGE_START) * min(1.0, (time.monotonic() - start) / seconds)
        gen = torch.Generator().manual_seed(step)
        loss = contrastive_loss(f, v, v[ranged_negatives(distances, tau, gen)], MARGIN)
        loss = loss + contrastive_loss(v, f, f[ranged_negatives(distances.T, tau, gen)], MARGIN)
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        losses.append(float(loss.detach()))
        step += 1
    face_net.eval()
    voice_net.eval()
    return (
        face_net,
        voice_net,
        {
            "steps": step,
            "seconds": round(time.monotonic() - start, 1),
            "loss_first": _mean(losses[:20]),
            "loss_last": _mean(losses[-20:]),
        },
    )


def _mean(values: list[float]) -> float | None:
    return round(float(np.mean(values)), 4) if values else None


def _augment_face(faces: npt.NDArray[np.uint8], rng: np.random.Generator) -> npt.NDArray[Any]:
    face = faces[rng.integers(len(faces))].astype(np.float32)
    if rng.random() < 0.5:
        face = face[:, ::-1]
    jittered: npt.NDArray[Any] = np.clip(
        face * rng.uniform(0.8, 1.2) + rng.uniform(-20, 20), 0, 255
    )
    return jittered


def scratch_voice(windows: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """The 3 s spectrogram of a segment's three windows (0, 77, 140), per-bin normalised."""
    whole = np.concatenate([windows[0], windows[2][20:]])
    return normalize_bins(whole)


async def _load(data: Path, cache: Path) -> list[IdentityTrack]:
    tracks = await prepare_all(data, cache, {"train"})
    return [t for t in tracks if t.speaking]


def check_inputs(data: Path, models: Path) -> None:
    """Refuse, before any work, a data folder without ``clips.csv`` or missing trunks.

    Raises:
        UsageError: a file is missing (exit code 2).
    """
    needed = [data / "clips.csv", *(models / f for f in TRUNK_FILES.values())]
    missing = [str(path) for path in needed if not path.is_file()]
    if missing:
        raise UsageError(
            f"talkscope train pins needs {', '.join(missing)}: pass --data (the shared clips) "
            "and --models (sface/ and resemblyzer/)"
        )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole training; returns the report written to ``training.json``."""
    from engine.models.pins_export import assemble_tower

    check_inputs(args.data, args.models)
    started = time.monotonic()
    all_tracks = asyncio.run(prepare_all(args.data, args.cache, {"train"}))
    tracks = [t for t in all_tracks if t.speaking]
    log(
        f"{len(tracks)} speaking tracks of {len(all_tracks)} ({len({t.identity for t in tracks})}"
        " identities)"
    )
    trunk = trunk_embeddings(tracks, args.models)
    config = TrainConfig(steps=args.steps, seed=args.seed)
    report: dict[str, Any] = {
        "data": {
            "split": "train",
            "tracks": len(all_tracks),
            "speaking_tracks": len(tracks),
            "identities": len({t.identity for t in tracks}),
            "face_frames": int(sum(len(t.faces) for t in trunk)),
            "voice_segments_3s": int(sum(len(t.voices) for t in trunk)),
        },
        "config": {
            "steps": config.steps,
            "batch": config.batch,
            "lr": config.lr,
            "margin": MARGIN,
            "seed": config.seed,
            "tau": {
                "curriculum": f"rank tau linear {TAU_START} -> {TAU_END} over 80% of steps",
                "curriculum-range": f"uniform in the easiest tau, tau {RANGE_START} -> 1",
            },
        },
        "cross_validation": {},
    }
    best: tuple[float, str, npt.NDArray[np.float64], npt.NDArray[np.bool_]] | None = None
    for schedule in SCHEDULES:
        auc, err, scores, labels = cross_validate(trunk, schedule, config)
        report["cross_validation"][schedule] = {"auc": round(auc, 4), "eer": round(err, 4)}
        log(f"4-fold CV over train identities, {schedule:16s}: AUC {auc:.3f}  EER {err:.3f}")
        if best is None or auc > best[0]:
            best = (auc, schedule, scores, labels)
    assert best is not None
    _, chosen, scores, labels = best
    a, b = platt(scores, labels)
    face_head, voice_head, losses = train_heads(trunk, chosen, config)
    report["final"] = {
        "schedule": chosen,
        "chosen_by": "highest out-of-fold AUC over train identities",
        "loss_first": _mean(losses[:50]),
        "loss_last": _mean(losses[-50:]),
    }
    calibration = {
        "voice_match": {
            "a": round(a, 4),
            "b": round(b, 4),
            "fitted_on": f"out-of-fold {chosen} scores, train identities",
        },
        "voice_voice": voice_platt(trunk),
        "face_reid": reid_threshold(trunk, "face"),
        "voice_reid": reid_threshold(trunk, "voice"),
    }
    report["calibration"] = calibration
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    for modality, head in (("face", face_head), ("voice", voice_head)):
        tower = TOWERS[modality]  # type: ignore[index]
        graph = assemble_tower(
            tower,
            args.models / TRUNK_FILES[modality],  # type: ignore[index]
            head.arrays(),
            slaney_mel_filterbank(),
        )
        (out / tower.file_name).write_bytes(graph)
    (out / "calibration.json").write_text(json.dumps(calibration, indent=2) + "\n")
    if args.scratch_seconds > 0:
        face_net, voice_net, info = train_scratch(tracks, args.scratch_seconds, args.seed)
        torch.save(
            {"face": face_net.state_dict(), "voice": voice_net.state_dict()},
            args.cache / "pins_scratch.pt",
        )
        report["scratch"] = info
        log(f"scratch: {info}")
    report["seconds"] = round(time.monotonic() - started, 1)
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def log(message: str) -> None:
    """Progress on stderr."""
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m pipelines.train_pins``."""
    from pipelines.identity_cli import add_train_pins_arguments

    parser = argparse.ArgumentParser(prog="talkscope train pins", description=__doc__)
    add_train_pins_arguments(parser)
    args = parser.parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
