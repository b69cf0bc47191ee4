"""Benchmark: how often does the sync model find an injected audio shift, on people it never saw?

Question: on the clips of the ``test`` split of ``../shared/data/clips.csv`` (identities never
used in training or model selection), with the audio shifted by -15..+15 frames, what share of
1 s, 2 s and 5 s windows get the offset exactly right, and within ±1 frame? How well do the
distances separate genuine from shifted pairs (AUC)? How does a model-free baseline do on the
same windows? And what confidence does the model give when the face is not the one speaking
(``silent`` split: a listener in a car while another person talks; audio of another clip) or
when there is no speech (``negative`` split)?

Method. Each clip is decoded once by the engine (``pipelines.sync_data``: our decoder, tracker,
crops and MFCC; its cache is reused). The shift is injected on timestamps: delaying the audio by
``k`` frames moves every MFCC frame ``40k`` ms later, which is what re-muxing the file with
audio pts shifted by ``40k`` ms gives the engine, since it pairs video and audio on timestamps
(``tests/test_sync_cli.py`` checks the end-to-end case on a real re-muxed file). The expected
offset is then ``-k`` (positive = audio leads). Embeddings come from the shipped ONNX towers
run by onnxruntime, through the same chunking as ``talkscope sync``
(:func:`engine.analysis.windows.chunk_windows`); each window of ``L`` frames is estimated by
:func:`engine.analysis.sync.estimate_sync` over its own ``L`` embeddings (the ±15-frame search,
zeros outside, as syncnet_python), exactly as a clip of that length would be.

Baseline (no learning): per frame, the mouth opening (inner-lip gap from the FaceMesh lip
points, divided by the mouth width) and the audio energy (MFCC c0 averaged over the frame's 4
steps); the offset is the lag of the highest Pearson correlation over the window, corrected by
the lag that is best on average over the *train* clips (speech energy and mouth opening are not
simultaneous).

AUC: per 1 s window with no shift, the genuine score is minus the mean distance at offset 0, and
the impostor scores are minus the mean distances at offsets 3..15 frames away (for the baseline:
the correlation at its calibrated lag against lags 3..15 frames away).

Run: ``python benchmarks/sync_accuracy.py [--data ../shared/data] [--cache DIR] [--weights DIR]``.
Prints a table and writes ``benchmarks/results/sync_accuracy.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks._common import environment, write_report  # noqa: E402
from engine.analysis.sync import estimate_sync  # noqa: E402
from engine.analysis.windows import (  # noqa: E402
    audio_window_range,
    frame_chunks,
    longest_run,
    mfcc_chunks,
    pair_windows,
)
from engine.models.loading import model_spec, resolve_weights, tower_backends  # noqa: E402
from engine.models.spec import ModelSpec  # noqa: E402
from engine.runtime.backends import InferenceBackend  # noqa: E402
from engine.vision.crops import mouth_opening  # noqa: E402
from pipelines.sync_data import CachedClip, load_split, prepare_all  # noqa: E402

SHIFTS = 15
SPANS = {"1s": 25, "2s": 50, "5s": 125}
AUC_MIN_GAP = 3
PACKAGES = ("onnxruntime", "numpy", "av", "torch")


@dataclass
class Embedded:
    """One clip's embeddings on its frame grid.

    ``video[t]`` embeds the window starting at frame ``t`` of the run; ``audio[p - low]`` embeds
    the 20 MFCC steps starting with run frame ``p`` (``low <= p``, may be negative: sound before
    the run). ``opening[t]`` and ``energy[p - low]`` are the baseline's per-frame signals.
    """

    name: str
    video: npt.NDArray[np.float32]
    audio: npt.NDArray[np.float32]
    low: int
    opening: npt.NDArray[np.float64]
    energy: npt.NDArray[np.float64]

    def audio_for(self, windows: int, delay: int) -> tuple[int, int]:
        """Run windows ``[start, stop)`` whose audio exists when it is delayed by ``delay``."""
        start = max(0, self.low + delay)
        stop = min(windows, self.low + self.audio.shape[0] + delay)
        return start, max(start, stop)


def run_tower(backend: InferenceBackend, name: str, chunks: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Embeddings of every chunk, 4 at a time, flattened to ``(windows, dim)``."""
    parts = [backend.run({name: chunks[i : i + 4]}) for i in range(0, chunks.shape[0], 4)]
    out = np.concatenate(parts)
    return out.reshape(-1, out.shape[-1])


def embed(
    clip: CachedClip, spec: ModelSpec, towers: dict[str, InferenceBackend] | None
) -> Embedded | None:
    """Video embeddings of the clip's longest run and audio embeddings wherever MFCC exists."""
    paired = pair_windows(clip.pts_ns, clip.mfcc, clip.mfcc_start_ns)
    run = longest_run(paired.starts, paired.pts_ns)
    starts, steps = paired.starts[run], paired.steps[run]
    if starts.size < SPANS["1s"]:
        return None
    window = spec.window
    chunk, context = window.chunk_windows, window.context_frames
    low, high = audio_window_range(int(steps[0]), clip.mfcc.shape[0])
    positions = high - low + 1
    first_step = int(steps[0]) + 4 * low
    video = audio = np.zeros((max(starts.size, positions), 1), np.float32)
    if towers is not None:  # the baseline alone needs no embeddings
        faces = frame_chunks(
            clip.face112, int(starts[0]), starts.size, chunk=chunk, context=context
        )
        video = run_tower(towers["video"], spec.video.input.name, faces / np.float32(255))
        mfcc = mfcc_chunks(clip.mfcc, first_step, positions, chunk=chunk, context=context)
        audio = run_tower(towers["audio"], spec.audio.input.name, mfcc[:, None])
    frames = clip.lips[int(starts[0]) : int(starts[0]) + starts.size]
    step_index = first_step + 4 * np.arange(positions)[:, None] + np.arange(4)[None, :]
    return Embedded(
        name=clip.name,
        video=video[: starts.size],
        audio=audio[:positions],
        low=low,
        opening=np.array([mouth_opening(points) for points in frames], dtype=np.float64),
        energy=clip.mfcc[step_index, 0].mean(axis=1).astype(np.float64),
    )


def audio_around(
    clip: Embedded, first: int, length: int, delay: int
) -> tuple[npt.NDArray[np.float32], int]:
    """The delayed audio's embeddings for windows ``first..first+length``, and the lead.

    Up to 15 more on each side where the sound exists, as the engine hands them to
    :func:`estimate_sync`.
    """
    start = first - delay - clip.low
    low = max(start - SHIFTS, 0)
    high = min(start + length + SHIFTS, clip.audio.shape[0])
    return clip.audio[low:high], start - low


def span_estimate(clip: Embedded, first: int, length: int, delay: int) -> Any:
    """``estimate_sync`` over one span of windows against the delayed audio."""
    return span_estimate_from(clip, clip, first, length, delay)


def span_estimate_from(
    clip: Embedded, source: Embedded, first: int, length: int, delay: int
) -> Any:
    """``estimate_sync`` of ``clip``'s windows against ``source``'s audio, delayed."""
    audio, lead = audio_around(source, first, length, delay)
    return estimate_sync(clip.video[first : first + length], audio, audio_lead=lead)


def zscore(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Zero mean, unit spread (a flat signal stays zero)."""
    spread = x.std()
    return (x - x.mean()) / spread if spread > 1e-9 else np.zeros_like(x)


def baseline_curve(clip: Embedded, first: int, length: int, delay: int) -> npt.NDArray[np.float64]:
    """Correlation of mouth opening and delayed energy at offsets +15..-15 (estimate_sync order).

    Entry ``j`` is offset ``15 - j``: opening at frame ``t`` against the delayed audio's energy
    at frame ``t - offset``, i.e. original energy at ``t - offset - delay``.
    """
    frames = np.arange(first, first + length)
    opening = zscore(clip.opening[frames])
    curve = np.full(2 * SHIFTS + 1, -1.0)
    for j, offset in enumerate(range(SHIFTS, -SHIFTS - 1, -1)):
        index = frames - offset - delay - clip.low
        ok = (index >= 0) & (index < clip.energy.shape[0])
        if ok.sum() >= length // 2:
            curve[j] = float(np.mean(opening[ok] * zscore(clip.energy[index[ok]])))
    return curve


def calibrate_baseline(clips: list[Embedded]) -> int:
    """The lag (frames) at which opening and energy correlate best, pooled over train clips."""
    total = np.zeros(2 * SHIFTS + 1)
    for clip in clips:
        total += baseline_curve(clip, 0, clip.video.shape[0], 0)
    return SHIFTS - int(np.argmax(total))


def spans_of(start: int, stop: int, length: int) -> list[int]:
    """Starts of the non-overlapping ``length``-window spans in ``[start, stop)``."""
    return list(range(start, stop - length + 1, length))


def shift_scores(clips: list[Embedded], bias: int) -> dict[str, Any]:
    """Exact and ±1 shares per span length, model and baseline, over shifts -15..+15."""
    counts = {f"{who}_{name}": [0, 0, 0] for who in ("model", "baseline") for name in SPANS}
    for clip in clips:
        windows = clip.video.shape[0]
        for delay in range(-SHIFTS, SHIFTS + 1):
            start, stop = clip.audio_for(windows, delay)
            for name, length in SPANS.items():
                for first in spans_of(start, stop, length):
                    model = span_estimate(clip, first, length, delay).offset_frames
                    curve = baseline_curve(clip, first, length, delay)
                    base = SHIFTS - int(np.argmax(curve)) - bias
                    for who, found in (("model", model), ("baseline", base)):
                        tally = counts[f"{who}_{name}"]
                        tally[0] += found == -delay
                        tally[1] += abs(found + delay) <= 1
                        tally[2] += 1
    return {
        key: {"exact": e / max(n, 1), "within_1": w / max(n, 1), "windows": n}
        for key, (e, w, n) in counts.items()
    }


def auc(genuine: list[float], impostor: list[float]) -> float:
    """Probability that a genuine score beats an impostor one (ties count half)."""
    g = np.asarray(genuine)[:, None]
    i = np.asarray(impostor)[None, :]
    return float(((g > i).sum() + 0.5 * (g == i).sum()) / (g.size * i.size))


def separation(clips: list[Embedded], bias: int) -> dict[str, float]:
    """Genuine-vs-shifted AUC on unshifted 1 s windows, model and baseline."""
    scores: dict[str, tuple[list[float], list[float]]] = {"model": ([], []), "baseline": ([], [])}
    length = SPANS["1s"]
    offsets = np.arange(SHIFTS, -SHIFTS - 1, -1)
    for clip in clips:
        start, stop = clip.audio_for(clip.video.shape[0], 0)
        for first in spans_of(start, stop, length):
            dists = span_estimate(clip, first, length, 0).mean_dists
            curve = baseline_curve(clip, first, length, 0)
            for who, values, centre in (("model", -dists, 0), ("baseline", curve, bias)):
                genuine, impostor = scores[who]
                genuine.append(float(values[offsets == centre][0]))
                impostor.extend(values[np.abs(offsets - centre) >= AUC_MIN_GAP].tolist())
    return {who: auc(g, i) for who, (g, i) in scores.items()}


def whole_clip(clip: Embedded, audio_of: Embedded | None = None, delay: int = 0) -> dict[str, Any]:
    """``talkscope sync``'s answer on the whole run: own audio (optionally delayed) or another's."""
    source = audio_of or clip
    start, stop = source.audio_for(clip.video.shape[0], delay)
    estimate = span_estimate_from(clip, source, start, stop - start, delay)
    count = stop - start
    return {
        "clip": clip.name,
        "offset_frames": estimate.offset_frames,
        "confidence": round(estimate.confidence, 3),
        "windows": count,
    }


def confidence_cases(
    test: list[Embedded], silent: list[Embedded], negative: list[Embedded]
) -> dict[str, Any]:
    """Whole-clip confidence: genuine, 120 ms delayed, another clip's audio, listener, no speech."""
    cases = {
        "genuine": [whole_clip(c) for c in test],
        "delayed_120ms": [whole_clip(c, delay=3) for c in test],
        "foreign_audio": [whole_clip(c, test[(i + 1) % len(test)]) for i, c in enumerate(test)],
        "listener_silent_split": [whole_clip(c) for c in silent],
        "no_speech_negative_split": [whole_clip(c) for c in negative],
    }
    summary: dict[str, Any] = {}
    for name, rows in cases.items():
        confidences = [r["confidence"] for r in rows]
        summary[name] = {
            "clips": len(rows),
            "median_confidence": float(np.median(confidences)) if rows else None,
            "rows": rows,
        }
    delayed = cases["delayed_120ms"]
    summary["delayed_120ms"]["share_at_minus_3_within_1"] = float(
        np.mean([abs(r["offset_frames"] + 3) <= 1 for r in delayed])
    )
    pairs = zip(delayed, cases["foreign_audio"], strict=True)
    summary["delayed_beats_foreign_confidence"] = float(
        np.mean([d["confidence"] > f["confidence"] for d, f in pairs])
    )
    return summary


async def ensure_cache(data: Path, cache: Path, splits: set[str]) -> None:
    """Decode the clips the benchmark needs into ``cache``, which exists (kept ones are reused)."""
    await prepare_all(data, cache, splits)


def embed_split(
    cache: Path, split: str, spec: ModelSpec, towers: dict[str, InferenceBackend] | None
) -> list[Embedded]:
    """Embeddings of every usable clip of one split."""
    out = []
    for clip in load_split(cache, split):
        embedded = embed(clip, spec, towers)
        if embedded is not None:
            out.append(embedded)
    return out


def _share(score: dict[str, Any]) -> float | None:
    """The ±1 share, or None for a clip too short for the span."""
    return round(score["within_1"], 3) if score["windows"] else None


def per_clip(clips: list[Embedded], bias: int) -> list[dict[str, Any]]:
    """Each clip's ±1 shares (1 s and 5 s, model and baseline) and its own whole-clip offset.

    Where the error is: a clip whose own audio-video offset is not 0 (or that the model reads
    as not 0) fails every window by that much, whatever the window length.
    """
    rows = []
    for clip in clips:
        scores = shift_scores([clip], bias)
        rows.append(
            {
                "clip": clip.name,
                "windows_1s": scores["model_1s"]["windows"],
                "windows_5s": scores["model_5s"]["windows"],
                "model_1s_within_1": round(scores["model_1s"]["within_1"], 3),
                "model_5s_within_1": _share(scores["model_5s"]),
                "baseline_5s_within_1": _share(scores["baseline_5s"]),
                "own_offset_frames": whole_clip(clip)["offset_frames"],
            }
        )
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Everything the table shows."""
    spec = model_spec("syncnet-lite")
    resolved = resolve_weights(spec, args.weights)
    towers = tower_backends(resolved, threads=args.threads)
    started = time.perf_counter()
    args.cache.mkdir(parents=True, exist_ok=True)
    asyncio.run(ensure_cache(args.data, args.cache, {"train", "test", "silent", "negative"}))
    split = {
        name: embed_split(args.cache, name, spec, None if name == "train" else towers)
        for name in ("train", "test", "silent", "negative")
    }
    embedded_s = time.perf_counter() - started
    bias = calibrate_baseline(split["train"])
    return {
        "model": spec.name,
        "weights": resolved.describe(),
        "test_clips": [c.name for c in split["test"]],
        "baseline_lag_frames": bias,
        "shifts": shift_scores(split["test"], bias),
        "per_clip": per_clip(split["test"], bias),
        "auc_1s": separation(split["test"], bias),
        "confidence": confidence_cases(split["test"], split["silent"], split["negative"]),
        "seconds": {"decode_and_embed": embedded_s, "total": time.perf_counter() - started},
        "environment": environment(PACKAGES, threads=args.threads),
    }


def print_table(report: dict[str, Any]) -> None:
    """The shares, the AUC and the confidences."""
    shifts = report["shifts"]
    print(f"\nSync accuracy on {len(report['test_clips'])} test clips, shifts -15..+15 frames")
    print(
        f"{'window':>7} | {'model exact':>11} {'model ±1':>9} | {'base exact':>10} "
        f"{'base ±1':>8} | {'windows':>7}"
    )
    for name in SPANS:
        m, b = shifts[f"model_{name}"], shifts[f"baseline_{name}"]
        print(
            f"{name:>7} | {m['exact']:>11.1%} {m['within_1']:>9.1%} | {b['exact']:>10.1%} "
            f"{b['within_1']:>8.1%} | {m['windows']:>7}"
        )
    print(f"\n{'clip':<48} {'1 s ±1':>7} {'5 s ±1':>7} {'base 5 s':>8} {'own':>4}")
    for row in report["per_clip"]:
        five, base = (
            "-" if row[key] is None else f"{row[key]:.1%}"
            for key in ("model_5s_within_1", "baseline_5s_within_1")
        )
        print(
            f"{row['clip']:<48} {row['model_1s_within_1']:>7.1%} {five:>7} {base:>8} "
            f"{row['own_offset_frames']:>+4d}"
        )
    auc_1s = report["auc_1s"]
    print(
        f"genuine-vs-shifted AUC (1 s): model {auc_1s['model']:.3f}, "
        f"baseline {auc_1s['baseline']:.3f} (baseline lag {report['baseline_lag_frames']:+d})"
    )
    print("whole-clip confidence (median):")
    for name, case in report["confidence"].items():
        if isinstance(case, dict) and "median_confidence" in case:
            print(f"  {name:>26}: {case['median_confidence']:.3f} over {case['clips']} clips")
    conf = report["confidence"]
    print(
        f"  120 ms delay read as -3±1: {conf['delayed_120ms']['share_at_minus_3_within_1']:.0%}"
        f"; its confidence above the foreign audio's: "
        f"{conf['delayed_beats_foreign_confidence']:.0%}"
    )


def main() -> int:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--data", type=Path, default=REPO_ROOT.parent / "shared" / "data")
    parser.add_argument(
        "--cache", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "cache"
    )
    parser.add_argument("--weights", type=Path, default=None, help="default: the shipped model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "sync_accuracy.json"
    )
    args = parser.parse_args()
    if not (args.data / "clips.csv").is_file():
        print(f"no clips.csv in {args.data}", file=sys.stderr)
        return 2
    report = run(args)
    print_table(report)
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
