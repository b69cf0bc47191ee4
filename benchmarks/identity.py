"""Identity benchmark on the ``test`` identities (never trained on): how far PINs goes here.

Cross-modal verification (one face frame vs 3 s of voice, same person or not): ROC AUC and EER
with 95% bootstrap intervals (identities resampled), for

- ``pins``: the shipped towers (pretrained trunks + heads trained by ``talkscope train pins``);
- ``untrained-heads``: the same pretrained unimodal trunks with freshly initialised heads, i.e.
  the pretrained-unimodal baseline without PINs training (a random projection of each modality);
- ``random-scratch``: the from-scratch networks with random weights;
- ``scratch``: the from-scratch networks trained by ``talkscope train pins`` (from its cache).

Also: AUC with negatives from the same source dataset only (removes what recording conditions
give away), voice -> face retrieval top-1 among N = 2, 5, 10 faces, face and voice
re-identification on the test identities seen in two clips, and the identity cost per stream
(ms of compute per second of input). Run::

    python benchmarks/identity.py [--data ../shared/data] [--cache .cache/pins]

prints a table and writes ``benchmarks/results/identity.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import environment, write_report  # noqa: E402
from engine.identity.engine import unit  # noqa: E402
from engine.identity.models import PINS_WEIGHTS_DIR, weights_digest  # noqa: E402
from engine.identity.scoring import bootstrap_ci, eer, roc_auc  # noqa: E402
from engine.identity.voice import slaney_mel_filterbank  # noqa: E402
from engine.models.pins import (  # noqa: E402
    FACE_TOWER,
    FACE_TRUNK_SIZE,
    VOICE_TOWER,
    VOICE_TRUNK_SIZE,
    Head,
    PinsTowerSpec,
    ScratchFaceNet,
    ScratchVoiceNet,
)
from engine.runtime.backends import OnnxBackend  # noqa: E402
from pipelines.pins_data import IdentityTrack, prepare_all  # noqa: E402
from pipelines.train_pins import TRUNK_FILES, run_batched, scratch_voice  # noqa: E402

Floats = npt.NDArray[np.float32]
Embedder = Callable[[IdentityTrack], tuple[Floats, Floats, Floats, Floats]]
"""track -> (PINs faces (n, 256), PINs voices (s, 256), trunk faces (n, 128), trunk voices)."""


def tower_embedder(face: OnnxBackend, voice: OnnxBackend) -> Embedder:
    """Embeddings through two assembled towers (a voice segment = mean of its 3 windows)."""

    def run(track: IdentityTrack) -> tuple[Floats, Floats, Floats, Floats]:
        f = run_batched(face, FACE_TOWER.input.name, track.faces.transpose(0, 3, 1, 2))
        flat = track.voices.reshape(-1, 160, 257)
        v = run_batched(voice, VOICE_TOWER.input.name, flat).reshape(len(track.voices), 3, -1)
        return f[:, :256], unit(v[:, :, :256].mean(axis=1)), f[:, 256:], unit(v[:, :, 256:].mean(1))

    return run


def scratch_embedder(face: ScratchFaceNet, voice: ScratchVoiceNet) -> Embedder:
    """Embeddings of the from-scratch networks (no trunk: the trunk slots repeat them)."""

    def run(track: IdentityTrack) -> tuple[Floats, Floats, Floats, Floats]:
        with torch.no_grad():
            f = face(torch.from_numpy(track.faces).float().permute(0, 3, 1, 2)).numpy()
            spectra = np.stack([scratch_voice(w) for w in track.voices])
            v = voice(torch.from_numpy(spectra)).numpy()
        return f, v, f, v

    return run


def source_of(clip: str) -> str:
    """The dataset a clip comes from (its folder)."""
    return clip.split("/")[1] if "/" in clip else clip


def verification(
    tracks: list[IdentityTrack], embedded: list[tuple[Floats, Floats, Floats, Floats]]
) -> dict[str, Any]:
    """AUC / EER (with intervals) over every (face frame, voice segment) pair."""
    names = sorted({t.identity for t in tracks})
    scores, labels, groups, same_source = [], [], [], []
    for i, ti in enumerate(tracks):
        for j, tj in enumerate(tracks):
            s = (embedded[i][0] @ embedded[j][1].T).ravel()
            scores.append(s)
            labels.append(np.full(s.shape, ti.identity == tj.identity))
            groups.append(np.full(s.shape, names.index(ti.identity)))
            same_source.append(np.full(s.shape, source_of(ti.clip) == source_of(tj.clip)))
    sc = np.concatenate(scores).astype(np.float64)
    lab, grp, src = np.concatenate(labels), np.concatenate(groups), np.concatenate(same_source)
    auc_ci = bootstrap_ci(roc_auc, sc, lab, grp, rounds=500)
    eer_ci = bootstrap_ci(eer, sc, lab, grp, rounds=500)
    keep = lab | src
    return {
        "pairs": int(len(sc)),
        "positives": int(lab.sum()),
        "auc": round(roc_auc(sc, lab), 4),
        "auc_ci95": [round(v, 4) for v in auc_ci],
        "eer": round(eer(sc, lab), 4),
        "eer_ci95": [round(v, 4) for v in eer_ci],
        "auc_same_source_negatives": round(roc_auc(sc[keep], lab[keep]), 4),
        "same_source_negatives": int((keep & ~lab).sum()),
    }


def balanced(
    tracks: list[IdentityTrack], embedded: list[tuple[Floats, Floats, Floats, Floats]]
) -> dict[str, Any]:
    """Identity-balanced cross-modal AUC, with a bootstrap interval over identities.

    For each voice segment, the share of other people's faces (track means) scoring below its
    own face; averaged per identity, then over identities. Unlike the pooled AUC, a long clip
    does not weigh more than a short one.
    """
    faces = np.stack([unit(e[0].mean(axis=0, keepdims=True))[0] for e in embedded])
    per_identity: dict[str, list[float]] = {}
    for j, t in enumerate(tracks):
        others = [k for k, u in enumerate(tracks) if u.identity != t.identity]
        scores = embedded[j][1] @ faces.T
        shares = [(s[j] > s[others]).mean() + 0.5 * (s[j] == s[others]).mean() for s in scores]
        per_identity.setdefault(t.identity, []).extend(shares)
    values = np.array([np.mean(v) for v in per_identity.values()])
    rng = np.random.default_rng(0)
    draws = [rng.choice(values, size=len(values)).mean() for _ in range(2000)]
    low, high = np.percentile(draws, [2.5, 97.5])
    return {
        "auc_balanced": round(float(values.mean()), 4),
        "auc_balanced_ci95": [round(float(low), 4), round(float(high), 4)],
    }


def voice_memory(
    tracks: list[IdentityTrack],
    embedded: list[tuple[Floats, Floats, Floats, Floats]],
    a: float,
    b: float,
) -> dict[str, Any]:
    """What the engine checks once it knows a face's voice.

    Each 3 s segment against the track's other segments (its own voice, leave one out), and
    other people's segments against it (a dub): resemblyzer cosine, AUC and EER, and the
    calibrated voice_match of each.
    """
    scores, labels = [], []
    for j, t in enumerate(tracks):
        own = embedded[j][3]
        if len(own) < 2:
            continue
        for i in range(len(own)):
            memory = unit(np.delete(own, i, axis=0).mean(axis=0, keepdims=True))[0]
            scores.append(float(own[i] @ memory))
            labels.append(True)
            for k, u in enumerate(tracks):
                if u.identity != t.identity:
                    scores.extend((embedded[k][3] @ memory).tolist())
                    labels.extend([False] * len(embedded[k][3]))
    sc, lab = np.array(scores), np.array(labels)
    match = 1 / (1 + np.exp(-(a * sc + b)))
    return {
        "auc": round(roc_auc(sc, lab), 4),
        "eer": round(eer(sc, lab), 4),
        "genuine": int(lab.sum()),
        "dubbed": int((~lab).sum()),
        "voice_match_genuine_mean": round(float(match[lab].mean()), 4),
        "voice_match_dubbed_mean": round(float(match[~lab].mean()), 4),
    }


def retrieval(
    tracks: list[IdentityTrack],
    embedded: list[tuple[Floats, Floats, Floats, Floats]],
    sizes: tuple[int, ...] = (2, 5, 10),
    draws: int = 200,
) -> dict[str, float]:
    """Voice -> face top-1: each voice segment against its face and N-1 other people's."""
    rng = np.random.default_rng(0)
    faces = [unit(e[0].mean(axis=0, keepdims=True))[0] for e in embedded]
    out = {}
    for n in sizes:
        hits, total = 0, 0
        for i, t in enumerate(tracks):
            others = [j for j, u in enumerate(tracks) if u.identity != t.identity]
            if len(others) < n - 1:
                continue
            for voice in embedded[i][1]:
                for _ in range(draws // max(1, len(embedded[i][1]))):
                    pick = rng.choice(others, size=n - 1, replace=False)
                    cands = np.stack([faces[i], *(faces[j] for j in pick)])
                    hits += int(np.argmax(cands @ voice) == 0)
                    total += 1
        out[f"top1_n{n}"] = round(hits / max(1, total), 4)
        out[f"chance_n{n}"] = round(1 / n, 4)
    return out


def reidentification(
    tracks: list[IdentityTrack],
    embedded: list[tuple[Floats, Floats, Floats, Floats]],
    thresholds: dict[str, float],
) -> dict[str, Any]:
    """Face / voice re-identification on identities seen in two clips.

    Top-1 among every other test clip, and the engine's same-person decision at its calibrated
    threshold.
    """
    clips: dict[str, list[int]] = {}
    for i, t in enumerate(tracks):
        clips.setdefault(t.clip, []).append(i)
    out: dict[str, Any] = {}
    for modality, slot in (("face", 2), ("voice", 3)):
        means = {
            c: unit(np.concatenate([embedded[i][slot] for i in idx]).mean(0, keepdims=True))[0]
            for c, idx in clips.items()
        }
        owner = {c: tracks[idx[0]].identity for c, idx in clips.items()}
        queries = [c for c in means if sum(owner[d] == owner[c] for d in means) > 1]
        top1, accepted, false_accepts, different = 0, 0, 0, 0
        for q in queries:
            scores = {d: float(means[q] @ means[d]) for d in means if d != q}
            best = max(scores, key=lambda d: scores[d])
            top1 += int(owner[best] == owner[q])
            same = [d for d in scores if owner[d] == owner[q]]
            accepted += int(all(scores[d] >= thresholds[modality] for d in same))
        for a in means:
            for b in means:
                if a < b and owner[a] != owner[b]:
                    different += 1
                    false_accepts += int(float(means[a] @ means[b]) >= thresholds[modality])
        out[modality] = {
            "queries": len(queries),
            "top1": round(top1 / max(1, len(queries)), 4),
            "same_person_accepted": round(accepted / max(1, len(queries)), 4),
            "different_pairs": different,
            "different_accepted": false_accepts,
            "threshold": thresholds[modality],
        }
    return out


def cost(tracks: list[IdentityTrack], face: OnnxBackend, voice: OnnxBackend) -> dict[str, Any]:
    """Compute per second of input of one single-face stream, on the longest test track.

    Faces at 5 a second, one 3 s voice segment per 1.5 s of speech (the live rates).
    """
    track = max(tracks, key=lambda t: len(t.faces))
    seconds = len(track.faces) / 5
    start = time.perf_counter()
    run_batched(face, FACE_TOWER.input.name, track.faces.transpose(0, 3, 1, 2))
    face_s = time.perf_counter() - start
    start = time.perf_counter()
    run_batched(voice, VOICE_TOWER.input.name, track.voices.reshape(-1, 160, 257))
    voice_s = time.perf_counter() - start
    return {
        "clip": track.clip,
        "seconds_of_input": round(seconds, 1),
        "face_ms_per_s": round(1000 * face_s / seconds, 2),
        "voice_ms_per_s": round(1000 * voice_s / seconds, 2),
        "total_ms_per_s": round(1000 * (face_s + voice_s) / seconds, 2),
        "share_of_one_core": round((face_s + voice_s) / seconds, 4),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark."""
    from engine.identity.models import load_config
    from engine.models.pins_export import assemble_tower

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("..") / "shared" / "data")
    parser.add_argument("--models", type=Path, default=Path("..") / "shared" / "models")
    parser.add_argument("--cache", type=Path, default=Path(".cache") / "pins")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "identity.json"
    )
    args = parser.parse_args(argv)

    # Every track of the single-face test clips: clips.csv says whose face and voice they are,
    # so no sync model is needed to pick the talking face here (training needs one).
    tracks = asyncio.run(prepare_all(args.data, args.cache, {"test"}))
    print(
        f"{len(tracks)} tracks on {len({t.identity for t in tracks})} test identities",
        file=sys.stderr,
    )
    face = OnnxBackend(PINS_WEIGHTS_DIR / FACE_TOWER.file_name, threads=1)
    voice = OnnxBackend(PINS_WEIGHTS_DIR / VOICE_TOWER.file_name, threads=1)
    torch.manual_seed(0)
    bank = slaney_mel_filterbank()

    def untrained(tower: PinsTowerSpec, trunk: str, size: int) -> OnnxBackend:
        """The tower with a freshly initialised head (seeded: face first, then voice)."""
        head = Head(size).eval().arrays()
        return OnnxBackend(assemble_tower(tower, args.models / TRUNK_FILES[trunk], head, bank))

    raw_face = untrained(FACE_TOWER, "face", FACE_TRUNK_SIZE)
    raw_voice = untrained(VOICE_TOWER, "voice", VOICE_TRUNK_SIZE)
    embedders: dict[str, Embedder] = {
        "pins": tower_embedder(face, voice),
        "untrained-heads": tower_embedder(raw_face, raw_voice),
        "random-scratch": scratch_embedder(ScratchFaceNet().eval(), ScratchVoiceNet().eval()),
    }
    scratch_file = args.cache / "pins_scratch.pt"
    if scratch_file.exists():
        state = torch.load(scratch_file, weights_only=True)
        trained_face, trained_voice = ScratchFaceNet(), ScratchVoiceNet()
        trained_face.load_state_dict(state["face"])
        trained_voice.load_state_dict(state["voice"])
        embedders["scratch"] = scratch_embedder(trained_face.eval(), trained_voice.eval())

    config = load_config()
    thresholds = {"face": config.face_threshold, "voice": config.voice_threshold}
    results: dict[str, Any] = {"models": {}}
    for name, embed in embedders.items():
        embedded = [embed(t) for t in tracks]
        entry = {
            **verification(tracks, embedded),
            **balanced(tracks, embedded),
            **retrieval(tracks, embedded),
        }
        if name == "pins":
            results["reidentification"] = reidentification(tracks, embedded, thresholds)
            results["voice_memory"] = voice_memory(tracks, embedded, config.voice_a, config.voice_b)
        results["models"][name] = entry
    results["cost_per_stream"] = cost(tracks, face, voice)
    results["data"] = {
        "split": "test",
        "tracks": len(tracks),
        "identities": len({t.identity for t in tracks}),
        "weights": weights_digest(),
    }
    print_table(results)
    results["environment"] = environment(["onnxruntime", "torch", "numpy"])
    write_report(results, args.out)
    return 0


def print_table(results: dict[str, Any]) -> None:
    """The human-readable summary."""
    print(
        f"cross-modal verification, {results['data']['identities']} test identities "
        f"({results['data']['tracks']} tracks)"
    )
    print(
        f"{'model':16s} {'pooled AUC [95% CI]':>22s} {'EER [95% CI]':>22s} "
        f"{'balanced AUC [95% CI]':>22s} {'same-src':>8s} {'top1 N=2':>9s} {'N=5':>6s} "
        f"{'N=10':>6s}"
    )
    for name, m in results["models"].items():
        auc = f"{m['auc']:.3f} [{m['auc_ci95'][0]:.3f}, {m['auc_ci95'][1]:.3f}]"
        err = f"{m['eer']:.3f} [{m['eer_ci95'][0]:.3f}, {m['eer_ci95'][1]:.3f}]"
        bal = m["auc_balanced_ci95"]
        fair = f"{m['auc_balanced']:.3f} [{bal[0]:.3f}, {bal[1]:.3f}]"
        print(
            f"{name:16s} {auc:>22s} {err:>22s} {fair:>22s} "
            f"{m['auc_same_source_negatives']:8.3f} "
            f"{m['top1_n2']:9.3f} {m['top1_n5']:6.3f} {m['top1_n10']:6.3f}"
        )
    v = results["voice_memory"]
    print(
        f"voice memory (a dub against the voice a face had): AUC {v['auc']:.3f}, EER "
        f"{v['eer']:.3f}; voice_match genuine {v['voice_match_genuine_mean']:.2f} vs dubbed "
        f"{v['voice_match_dubbed_mean']:.2f} ({v['genuine']} / {v['dubbed']} segments)"
    )
    for modality, r in results["reidentification"].items():
        print(
            f"{modality} re-id (identities in two clips): top-1 {r['top1']:.2f} over "
            f"{r['queries']} queries; same person accepted {r['same_person_accepted']:.2f}; "
            f"different-person pairs accepted {r['different_accepted']}/{r['different_pairs']} "
            f"at threshold {r['threshold']}"
        )
    c = results["cost_per_stream"]
    print(
        f"identity cost per stream: {c['face_ms_per_s']} ms/s faces + {c['voice_ms_per_s']} "
        f"ms/s voice = {c['total_ms_per_s']} ms per second of input (one core)"
    )


if __name__ == "__main__":
    raise SystemExit(main())
