"""Benchmark: how many seconds does ``talkscope sync`` take per minute of 25 fps video on a CPU?

Question: on a real 60 s talking-head clip (``edtalk/pose_source2.mp4``, 25 fps, one face), how
long does the offline sync of one file take per minute of video with SyncNet-lite and with
SyncNet v2, on our path (decode once, crops and MFCC in memory, every window through shared
batchers, onnxruntime) and on a faithful re-implementation of syncnet_python's pipeline shape
measured in the same run: every crop written as a JPEG (``cv2.imwrite``) and read back one file
at a time (``cv2.imread``), the audio written to and read from a 16 kHz WAV, MFCC by
python_speech_features over the whole audio, and the model run in batches of 20 windows with
torch exactly as ``SyncNetInstance.evaluate`` does (no ``no_grad``, ``calc_pdist`` loop)? And
what share of the time is the model?

Both pipelines start from the same front-end (our decoder and face tracker: syncnet_python's
S3FD detector is not re-implemented here) and run the *same* weights: SyncNet-lite's shipped
ones, and seeded random ones (``torch.manual_seed(0)``) for SyncNet v2, whose published file is
not redistributed (the compute does not depend on the values).

How a batch reaches the model is the point of the comparison. syncnet_python stacks one input per
window (``imtv[:, :, vframe:vframe + 5]`` for each of the batch's 20 windows): nothing is shared
between windows. For SyncNet v2 that input is the window's 5 frames; SyncNet-lite is a chunk
model whose encoders look 6 frames around a window, so its per-window input is 17 frames and
each frame is encoded 17 times. Our path feeds it 48 windows a call (64 frames, each encoded
1.33 times). That is the reference the target is measured against; a second reference row gives
the batch's 20 windows to SyncNet-lite as one shared chunk, an optimisation syncnet_python does
not have, to show how much of the gain is that sharing. SyncNet v2 is timed on the first 10 s of
the clip and scaled to a minute (its cost is linear in windows); SyncNet-lite on the whole 60 s.

Conclusion (2-core x86_64 VM shared with other jobs, Python 3.11, ``--threads 1``: pinned to one
core, one thread for torch, onnxruntime and OpenCV; seconds per minute of video; see the table
this script prints and ``benchmarks/results/offline_sync.json``):

- SyncNet-lite: ours 16.3 s/min against 339 s/min for syncnet_python's shape, **20.8x** (target
  10x: met). Against the shared-chunk variant (27.2 s/min) ours is 1.7x: the sharing of frames
  between windows is most of the gain, onnxruntime against torch the rest (ours on torch: 30.8
  s/min). The model is 64% of our time (10.5 s/min, 7.0 ms per window, nearly all Light-ASD's
  visual encoder); decoding and face tracking are 5.5-5.8 s/min in every pipeline.
- SyncNet v2: ours 52.1 s/min against 67.7 s/min (1.30x); ours on torch 59.8 s/min (1.13x). The
  model is 84% of our time (43.8 s/min, 30 ms per window) and 84% of the reference's; the JPEG
  round trip and the float64 stack of every crop add about 4.6 s/min there. SyncNet v2 windows
  cannot share frames (its first layer reads all 5 at once), so only the I/O differs: on one
  core it runs at about real time, and bulk v2 scoring wants a GPU (``--providers cuda``).
- Batch size barely matters on one CPU thread: SyncNet v2's video tower costs 29-38 ms per
  window at any batch from 1 to 32, SyncNet-lite's about 6-6.4 ms per window from 1 to 8 chunks.

Run from the repository root: ``python benchmarks/offline_sync.py [--threads N] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks._common import environment, write_report  # noqa: E402


def _threads_from_argv() -> int:
    """``--threads`` is needed before numpy, torch and onnxruntime are imported."""
    for index, arg in enumerate(sys.argv):
        if arg == "--threads" and index + 1 < len(sys.argv):
            return max(1, int(sys.argv[index + 1]))
        if arg.startswith("--threads="):
            return max(1, int(arg.split("=", 1)[1]))
    return 1


THREADS = _threads_from_argv()
os.environ.update(
    OMP_NUM_THREADS=str(THREADS), OPENBLAS_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS)
)
if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:THREADS]))

import av  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import numpy.typing as npt  # noqa: E402
import python_speech_features  # noqa: E402
import torch  # noqa: E402
from scipy import signal  # noqa: E402
from scipy.io import wavfile  # noqa: E402
from torch import nn  # noqa: E402

import pipelines.sync as sync_pipeline  # noqa: E402
from engine.models.loading import ResolvedWeights, cli_name, tower_backends  # noqa: E402
from engine.models.spec import SYNCNET_LITE, SYNCNET_V2, ModelSpec, TowerName  # noqa: E402
from engine.models.syncnet_lite import SyncNetLiteModel  # noqa: E402
from engine.models.syncnet_v2 import SyncNetV2Model  # noqa: E402
from engine.runtime.backends import InferenceBackend  # noqa: E402
from pipelines.features import ClipFeatures, extract_clip  # noqa: E402
from pipelines.sync import SyncRunner  # noqa: E402

torch.set_num_threads(THREADS)
cv2.setNumThreads(THREADS)

MACHINE = f"2-core x86_64 VM shared with other jobs, Python 3.11, {THREADS} thread(s) pinned"
CLIP = REPO_ROOT.parent / "shared" / "data" / "av" / "edtalk" / "pose_source2.mp4"
WARMUP_CLIP = REPO_ROOT.parent / "shared" / "data" / "av" / "grid_lipnet" / "bbaf2n.mpg"
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "offline_sync.json"
PACKAGES = (
    "torch",
    "onnxruntime",
    "onnx",
    "numpy",
    "opencv-python-headless",
    "av",
    "python_speech_features",
    "scipy",
    "ai-edge-litert",
)
LITE_STATE = REPO_ROOT / "engine" / "models" / "weights" / "syncnet_lite" / "syncnet_lite.pt"
REFERENCE_BATCH = 20  # syncnet_python demo_syncnet.py --batch_size default
VSHIFT = 15  # syncnet_python --vshift default
SECONDS = {SYNCNET_LITE.name: None, SYNCNET_V2.name: 10.0}  # None: the whole clip


class Stopwatch:
    """Named wall-clock sections, in seconds."""

    def __init__(self) -> None:
        self.parts: dict[str, float] = {}

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        """Add the time spent in the ``with`` block to ``name``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.parts[name] = self.parts.get(name, 0.0) + time.perf_counter() - start


class TimedBackend:
    """An :class:`InferenceBackend` that adds the time of every ``run`` to a stopwatch."""

    def __init__(self, inner: InferenceBackend, watch: Stopwatch) -> None:
        self.inner = inner
        self.watch = watch

    @property
    def name(self) -> str:
        """The wrapped back-end's name."""
        return self.inner.name

    @property
    def providers(self) -> tuple[str, ...]:
        """The wrapped back-end's providers."""
        return self.inner.providers

    def run(self, inputs: Mapping[str, npt.NDArray[Any]]) -> npt.NDArray[np.float32]:
        """Run the wrapped back-end, timed as ``model``."""
        with self.watch.part("model"):
            return self.inner.run(inputs)


def seeded_model(spec: ModelSpec) -> nn.Module:
    """SyncNet-lite with its shipped weights; SyncNet v2 seeded random (``manual_seed(0)``)."""
    torch.manual_seed(0)
    if spec is SYNCNET_V2:
        return SyncNetV2Model().eval()
    model = SyncNetLiteModel()
    model.load_state_dict(torch.load(LITE_STATE, map_location="cpu", weights_only=True))
    return model.eval()


# --- ours ----------------------------------------------------------------------------------------


def run_ours(spec: ModelSpec, model: nn.Module, backend: str) -> dict[str, Any]:
    """``talkscope sync``'s path on the clip: SyncRunner.analyse_file, model and front-end timed."""
    resolved = ResolvedWeights(spec, "argument", Path("<seeded random>"), module=model)
    inner = tower_backends(resolved, backend=backend, threads=THREADS)  # type: ignore[arg-type]
    for tower, engine in inner.items():  # first-call costs (allocations, kernels) out of the run
        shape = spec.tower(tower).input.shape
        engine.run({spec.tower(tower).input.name: np.zeros((1, *shape), np.float32)})
    watch = Stopwatch()
    backends: dict[TowerName, InferenceBackend] = {
        tower: TimedBackend(engine, watch) for tower, engine in inner.items()
    }
    real_extract = extract_clip  # what pipelines.sync calls

    async def timed_extract(*args: Any, **kwargs: Any) -> ClipFeatures:
        with watch.part("decode_faces"):
            return await real_extract(*args, **kwargs)

    async def analyse() -> sync_pipeline.FileSyncReport:
        async with SyncRunner(spec, backends) as runner:
            return await runner.analyse_file(str(CLIP), max_seconds=SECONDS[spec.name])

    sync_pipeline.extract_clip = timed_extract  # type: ignore[attr-defined]
    try:
        with watch.part("total"):
            report = asyncio.run(analyse())
    finally:
        sync_pipeline.extract_clip = real_extract  # type: ignore[attr-defined]
    parts = dict(watch.parts)
    parts["other"] = parts["total"] - parts["decode_faces"] - parts["model"]
    return {
        "pipeline": f"talkscope ({backend})",
        "video_frames": report.video_frames,
        "windows": report.windows,
        "seconds": parts,
    }


# --- syncnet_python's shape ----------------------------------------------------------------------


def decode_audio_16k(path: Path, max_seconds: float | None) -> npt.NDArray[np.int16]:
    """What ``ffmpeg -ac 1 -ar 16000 -acodec pcm_s16le`` gives: 16 kHz mono int16."""
    resampler = av.AudioResampler(format="s16", layout="mono", rate=16000)
    chunks: list[npt.NDArray[Any]] = []
    limit = math.inf if max_seconds is None else max_seconds * 16000
    total = 0
    with av.open(str(path)) as container:
        for frame in container.decode(audio=0):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1))
                total += chunks[-1].size
            if total >= limit:
                break
    audio = np.concatenate(chunks).astype(np.int16)
    return audio if max_seconds is None else audio[: int(limit)]


def calc_pdist(feat1: torch.Tensor, feat2: torch.Tensor, vshift: int) -> list[torch.Tensor]:
    """syncnet_python's ``calc_pdist``, as it is."""
    win_size = vshift * 2 + 1
    feat2p = torch.nn.functional.pad(feat2, (0, 0, vshift, vshift))
    dists = []
    for i in range(0, len(feat1)):
        dists.append(
            torch.nn.functional.pairwise_distance(
                feat1[[i], :].repeat(win_size, 1), feat2p[i : i + win_size, :]
            )
        )
    return dists


def lite_window(
    imtv: torch.Tensor, cct: torch.Tensor, first: int, last: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """SyncNet-lite's input for the windows ``first..last - 1`` as one chunk (6 frames of context).

    With ``last = first + 1`` this is one window on its own, as syncnet_python feeds every window
    of a batch (``imtv[:, :, vframe:vframe + 5]``): the window's 5 frames and the context the
    model needs around them, 17 frames in all.
    """
    context = SYNCNET_LITE.window.context_frames
    index = np.arange(first - context, last + 4 + context)
    video = imtv[:, np.clip(index, 0, imtv.shape[1] - 1)]
    steps = (4 * index[:, None] + np.arange(4)[None, :]).reshape(-1)
    return video, cct[:, :, :, np.clip(steps, 0, cct.shape[3] - 1)]


def reference_batch(
    imtv: torch.Tensor, cct: torch.Tensor, frames: range, shape: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of syncnet_python's loop: ``frames`` are the batch's window starts.

    ``shape``: ``"windows"`` stacks one input per window, as syncnet_python does (SyncNet v2's
    5 frames; SyncNet-lite's 17); ``"chunk"`` gives SyncNet-lite the batch's 20 windows as one
    chunk sharing its frames, an optimisation syncnet_python does not have (reported beside).
    """
    if shape == "chunk":
        return lite_window(imtv, cct, frames.start, frames.stop)
    if imtv.ndim == 5:  # SyncNet v2: (1, 3, T, 224, 224) and 20 MFCC steps a window
        video = torch.cat([imtv[:, :, v : v + 5, :, :] for v in frames], 0)
        return video, torch.cat([cct[:, :, :, v * 4 : v * 4 + 20] for v in frames], 0)
    pairs = [lite_window(imtv, cct, v, v + 1) for v in frames]
    return torch.cat([p[0] for p in pairs], 0), torch.cat([p[1] for p in pairs], 0)


def run_reference(spec: ModelSpec, model: nn.Module, shape: str = "windows") -> dict[str, Any]:
    """syncnet_python's shape: JPEGs on disk, WAV on disk, psf MFCC, torch batches of 20.

    ``shape`` is how a batch's windows reach the model (:func:`reference_batch`).
    """
    watch = Stopwatch()
    face = spec is SYNCNET_V2
    max_seconds = SECONDS[spec.name]
    with watch.part("total"):
        with watch.part("decode_faces"):  # the same front-end as ours (not S3FD)
            features = asyncio.run(
                extract_clip(
                    str(CLIP),
                    preset=spec.window.mfcc_preset,
                    want_face=face,
                    max_seconds=max_seconds,
                )
            )
        track = max(features.tracks, key=lambda t: len(t.pts_ns))
        with tempfile.TemporaryDirectory(prefix="syncnet-ref-") as work:
            with watch.part("audio_wav"):  # ffmpeg ... audio.wav
                audio_16k = decode_audio_16k(CLIP, max_seconds)
                wavfile.write(os.path.join(work, "audio.wav"), 16000, audio_16k)
            with watch.part("jpeg_write"):  # ffmpeg ... -f image2 %06d.jpg
                crops = track.face if face else track.face112
                assert crops is not None
                for index, crop in enumerate(crops):
                    image = cv2.cvtColor(crop, cv2.COLOR_RGB2BGR) if face else crop
                    cv2.imwrite(os.path.join(work, f"{index + 1:06d}.jpg"), image)
            with watch.part("jpeg_read"):  # SyncNetInstance.evaluate, "Load video"
                flist = sorted(glob.glob(os.path.join(work, "*.jpg")))
                flag = cv2.IMREAD_COLOR if face else cv2.IMREAD_GRAYSCALE
                images: list[Any] = [cv2.imread(fname, flag) for fname in flist]
                if face:
                    im = np.stack(images, axis=3)
                    im = np.expand_dims(im, axis=0)
                    im = np.transpose(im, (0, 3, 4, 1, 2))  # (1, 3, T, 224, 224)
                    imtv = torch.from_numpy(im.astype(float)).float()
                else:  # SyncNet-lite's layout: (1, T, 112, 112), 0..1
                    im = np.expand_dims(np.stack(images, axis=0), axis=0)
                    imtv = torch.from_numpy(im.astype(float)).float() / 255.0
            with watch.part("mfcc"):  # "Load audio"
                sample_rate, audio = wavfile.read(os.path.join(work, "audio.wav"))
                mfcc = zip(*python_speech_features.mfcc(audio, sample_rate), strict=True)
                mfcc_array = np.stack([np.array(i) for i in mfcc])
                cc = np.expand_dims(np.expand_dims(mfcc_array, axis=0), axis=0)
                cct = torch.from_numpy(cc.astype(float)).float()
        min_length = min(len(images), math.floor(len(audio) / 640))
        lastframe = min_length - 5
        im_feat, cc_feat = [], []
        with watch.part("model"):  # "Generate video and audio feats", as it is: no no_grad
            for i in range(0, lastframe, REFERENCE_BATCH):
                frames = range(i, min(lastframe, i + REFERENCE_BATCH))
                im_in, cc_in = reference_batch(imtv, cct, frames, shape)
                im_out = model.forward_video(im_in)  # type: ignore[operator]
                cc_out = model.forward_audio(cc_in)  # type: ignore[operator]
                im_feat.append(im_out.data.cpu().reshape(-1, im_out.shape[-1]))
                cc_feat.append(cc_out.data.cpu().reshape(-1, cc_out.shape[-1]))
        with watch.part("sync"):  # "Compute offset"
            im_all, cc_all = torch.cat(im_feat, 0), torch.cat(cc_feat, 0)
            dists = calc_pdist(im_all, cc_all, vshift=VSHIFT)
            mdist = torch.mean(torch.stack(dists, 1), 1)
            minval, minidx = torch.min(mdist, 0)
            fdist = np.stack([dist[minidx].numpy() for dist in dists])
            fconf = torch.median(mdist).numpy() - fdist
            signal.medfilt(fconf, kernel_size=9)
    parts = dict(watch.parts)
    label = "syncnet_python shape (torch)"
    return {
        "pipeline": label if shape == "windows" else f"{label}, 20-window chunks",
        "video_frames": features.video_frames,
        "windows": int(im_all.shape[0]),
        "seconds": parts,
    }


# --- batch sizes ---------------------------------------------------------------------------------

SWEEP = {SYNCNET_LITE.name: (1, 2, 4, 8), SYNCNET_V2.name: (1, 4, 8, 16, 32)}
"""Batch sizes tried per model: items are windows for SyncNet v2, 48-window chunks for lite."""


def batch_sweep(spec: ModelSpec, model: nn.Module) -> list[dict[str, Any]]:
    """Milliseconds per window of each onnxruntime tower by batch size (for ``max_batch``)."""
    resolved = ResolvedWeights(spec, "argument", Path("<seeded random>"), module=model)
    backends = tower_backends(resolved, threads=THREADS)
    rng = np.random.default_rng(0)
    rows = []
    for batch in SWEEP[spec.name]:
        row: dict[str, Any] = {"batch": batch}
        for tower in spec.towers:
            shape = (batch, *tower.input.shape)
            inputs = {tower.input.name: rng.random(shape, dtype=np.float32) * 255}
            backends[tower.tower].run(inputs)  # warm this shape
            repeats = max(2, 96 // batch if spec is SYNCNET_V2 else 8 // batch)
            start = time.perf_counter()
            for _ in range(repeats):
                backends[tower.tower].run(inputs)
            windows = repeats * batch * spec.window.chunk_windows
            row[f"{tower.tower}_ms_per_window"] = 1000 * (time.perf_counter() - start) / windows
        rows.append(row)
    print(f"\n{cli_name(spec)} onnxruntime, ms per window by batch size ({THREADS} thread(s))")
    print(f"{'batch':>6} {'video':>8} {'audio':>8}")
    for row in rows:
        video, audio = row["video_ms_per_window"], row["audio_ms_per_window"]
        print(f"{row['batch']:>6} {video:>8.3f} {audio:>8.3f}")
    return rows


# --- the run -------------------------------------------------------------------------------------


def warm_up() -> None:
    """Numba JIT, LiteRT model loading: first-call costs neither pipeline should carry."""
    for preset in ("syncnet",):
        asyncio.run(extract_clip(str(WARMUP_CLIP), preset=preset, want_face=True, max_seconds=1))


def run() -> dict[str, Any]:
    warm_up()
    cases = []
    for spec in (SYNCNET_LITE, SYNCNET_V2):
        model = seeded_model(spec)
        with torch.no_grad():  # warm torch's first call, as the backends are warmed
            model.forward_video(torch.zeros((1, *spec.video.input.shape)))  # type: ignore[operator]
            model.forward_audio(torch.zeros((1, *spec.audio.input.shape)))  # type: ignore[operator]
        reference = run_reference(spec, model)
        runs = [run_ours(spec, model, "onnx"), run_ours(spec, model, "torch"), reference]
        if spec is SYNCNET_LITE:
            runs.append(run_reference(spec, model, shape="chunk"))
        for result in runs:
            video_s = result["video_frames"] / 25.0
            result["video_seconds"] = video_s
            result["s_per_min"] = result["seconds"]["total"] * 60.0 / video_s
            result["model_share"] = result["seconds"]["model"] / result["seconds"]["total"]
            result["ms_per_window_model"] = 1000 * result["seconds"]["model"] / result["windows"]
        for result in runs:
            result["speedup_vs_reference"] = reference["s_per_min"] / result["s_per_min"]
        cases.append(
            {
                "model": cli_name(spec),
                "clip": str(CLIP.relative_to(REPO_ROOT.parent)),
                "seconds_of_video_timed": runs[0]["video_seconds"],
                "max_batch": sync_pipeline.DEFAULT_MAX_BATCH[spec.name],
                "runs": runs,
            }
        )
        print_case(cases[-1])
        cases[-1]["batch_sweep"] = batch_sweep(spec, model)
    return {
        "question": __doc__.splitlines()[0] if __doc__ else "",
        "weights": (
            "syncnet-lite: the shipped weights; syncnet-v2: seeded random (torch.manual_seed(0)); "
            "the same for every pipeline of a model"
        ),
        "environment": environment(PACKAGES, machine=MACHINE, threads=THREADS),
        "cases": cases,
    }


PARTS = ("decode_faces", "audio_wav", "jpeg_write", "jpeg_read", "mfcc", "model", "sync", "other")


def print_case(case: dict[str, Any]) -> None:
    """One model's runs as a table: seconds per minute of video, by part."""
    timed = case["seconds_of_video_timed"]
    scale = 60.0 / timed
    print(
        f"\n{case['model']}: {timed:.1f} s of {case['clip']} timed, scaled to 60 s "
        f"({'shipped' if case['model'] == 'syncnet-lite' else 'seeded random'} weights)"
    )
    header = (
        f"{'pipeline':<46} {'s/min':>7} {'x faster':>8} {'model %':>7} {'ms/win':>7}  "
        + " ".join(f"{part[:11]:>11}" for part in PARTS)
    )
    print(header)
    print("-" * len(header))
    for result in case["runs"]:
        seconds = result["seconds"]
        parts = " ".join(
            f"{seconds[p] * scale:>11.2f}" if p in seconds else f"{'-':>11}" for p in PARTS
        )
        print(
            f"{result['pipeline']:<46} {result['s_per_min']:>7.2f} "
            f"{result['speedup_vs_reference']:>8.2f} {100 * result['model_share']:>6.1f}% "
            f"{result['ms_per_window_model']:>7.2f}  {parts}"
        )


def main() -> int:
    """Run, print, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--threads", type=int, default=1, help="cores and threads (default 1)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if not CLIP.exists():
        print(f"benchmark needs ../shared/data/av: missing {CLIP}", file=sys.stderr)
        return 2
    report = run()
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
