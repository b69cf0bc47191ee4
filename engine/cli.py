"""``talkscope`` command line: parse, call a pipeline, print. Nothing else lives here.

Exit codes: 0 success, 1 internal failure, 2 bad usage or input, 130 interrupted.
Errors print one line on stderr; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from engine import __version__
from engine.core.errors import EngineError, InputError, SourceUnavailable, UsageError
from engine.dsp.mfcc import PRESETS

if TYPE_CHECKING:
    from engine.models.spec import ModelSpec, TensorSpec
    from engine.vision.stage import FaceConfig
    from pipelines.faces import FacesReport
    from pipelines.inspect import InspectReport
    from pipelines.sync import FileSyncReport, SyncProgress, SyncRunner

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

MEDIA_SUFFIXES = frozenset(
    {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".flv", ".ts", ".mts"}
    | {".wmv", ".3gp", ".ogv"}
)
"""What ``talkscope sync FOLDER`` takes from a folder (case-insensitive)."""

SYNC_MODELS = ("syncnet-lite", "syncnet-v2")


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so ``main`` owns every exit code."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (also used to render ``--help``)."""
    parser = _Parser(prog="talkscope", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"talkscope {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    commands = parser.add_subparsers(dest="command", parser_class=_Parser)

    inspect = commands.add_parser(
        "inspect",
        help="decode sources through the audio/video front-end and summarise them",
        description=(
            "Decode each source (file, URL or device:) to 16 kHz mono audio and 25 fps video, "
            "run the streaming MFCC, and print what came out and how fast. With no source, "
            "runs on the embedded demo clip."
        ),
    )
    inspect.add_argument("sources", nargs="*", metavar="SOURCE", help="path, URL or device:")
    inspect.add_argument("--json", action="store_true", help="one JSON object per source")
    inspect.add_argument("--preset", choices=sorted(PRESETS), default="syncnet")
    inspect.add_argument("--paced", action="store_true", help="read files at real time")
    inspect.add_argument(
        "--seconds", type=float, default=None, help="stop each source after this much media time"
    )

    faces = commands.add_parser(
        "faces",
        help="find and track the faces of video files and summarise each track",
        description=(
            "Track every face of each source (detection every k frames, landmark tracking in "
            "between) and print, per track, its first and last frame on the 25 fps grid, the "
            "frames it covers and its median box [x0, y0, x1, y1] in source pixels."
        ),
    )
    faces.add_argument("sources", nargs="+", metavar="PATH", help="file, URL or device:")
    faces.add_argument("--json", action="store_true", help="one JSON object per source")
    faces.add_argument(
        "--preview", type=Path, metavar="OUT.mp4", help="write boxes, ids and lips over the video"
    )
    faces.add_argument("--max-faces", type=int, default=8, help="most faces tracked at once")
    faces.add_argument(
        "--seconds", type=float, default=None, help="stop each source after this much video"
    )

    sync = commands.add_parser(
        "sync",
        help="estimate the audio-video offset of every face track of video files",
        description=(
            "Decode each file once, pair every 5-frame window of every face track with its 20 "
            "MFCC steps, embed them with a SyncNet model (the windows of all files share "
            "batches) and print, per track, the offset (positive = audio leads), LSE-C "
            "confidence, LSE-D min distance, windows used and median box. A folder stands for "
            "the media files in it. Needs trained weights: see `talkscope models`."
        ),
    )
    sync.add_argument("paths", nargs="+", metavar="PATH", help="file, URL or folder of files")
    sync.add_argument("--json", action="store_true", help="one JSON object per file")
    sync.add_argument("--model", choices=SYNC_MODELS, default="syncnet-lite")
    sync.add_argument(
        "--weights",
        type=Path,
        metavar="FILE",
        help="torch state dict, or a folder with video.onnx and audio.onnx",
    )
    sync.add_argument("--jobs", type=int, default=1, help="files decoded at once (default 1)")
    sync.add_argument("--backend", choices=("onnx", "torch"), default="onnx")
    sync.add_argument(
        "--providers",
        default="cpu",
        metavar="LIST",
        help="execution providers, most preferred first: cpu, cuda, tensorrt (comma-separated)",
    )
    sync.add_argument(
        "--progress", action="store_true", help="progress on stderr even when it is no terminal"
    )
    sync.add_argument(
        "--seconds", type=float, default=None, help="stop each file after this much video"
    )

    serve = commands.add_parser(
        "serve",
        help="run the live engine on sources and serve its events over WebSocket",
        description=(
            "Run sources (files play in real time, URLs and device: capture live) through the "
            "live engine and serve active-speaker, sync, track, stream and stats events at "
            "ws://HOST:PORT/events. With no --source, the embedded demo clip plays in a loop. "
            "A source may be named ID=URI; otherwise streams are s0, s1, ..."
        ),
    )
    serve.add_argument(
        "--source",
        action="append",
        default=[],
        metavar="URI",
        help="a path, URL or device: URI (repeat for several streams)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    serve.add_argument("--port", type=int, default=8765, help="port (0: any free port)")
    serve.add_argument(
        "--token",
        default=None,
        help="clients must present this token (default: $TALKSCOPE_TOKEN if set)",
    )
    serve.add_argument("--window-s", type=float, default=2.0, help="sync window, seconds")
    serve.add_argument("--loop", action="store_true", help="play file sources in a loop")
    serve.add_argument(
        "--exit-when-done",
        action="store_true",
        help="stop once every source has ended (scripts, benchmarks)",
    )
    serve.add_argument(
        "--providers",
        default="cpu",
        help="onnxruntime providers for the models: cpu, cuda, tensorrt",
    )
    serve.add_argument(
        "--no-demo",
        action="store_true",
        help="with no --source, play nothing and wait for WebRTC publishers",
    )
    serve.add_argument(
        "--no-whip", action="store_true", help="refuse WebRTC publishers (no /whip endpoint)"
    )
    serve.add_argument(
        "--gallery",
        type=Path,
        default=None,
        metavar="DB",
        help="identity gallery whose names events carry (default: $TALKSCOPE_GALLERY or "
        "~/.local/share/talkscope/gallery.db when it exists); re-read when it changes",
    )
    serve.add_argument(
        "--no-identity", action="store_true", help="no identity events (saves the PINs towers' CPU)"
    )
    serve.add_argument(
        "--max-publishers", type=int, default=8, help="WebRTC publishers at once (default 8)"
    )
    serve.add_argument(
        "--ice-server",
        action="append",
        default=[],
        metavar="URL",
        help="a STUN/TURN URL for WebRTC (repeat; default: none, host candidates only)",
    )
    publish = commands.add_parser(
        "publish",
        help="publish a source to a talkscope server (or any WHIP endpoint) over WebRTC",
        description=(
            "Read SOURCE (a file plays in real time, a URL or device: captures live) and send "
            "its audio and video over WebRTC to a WHIP endpoint, e.g. "
            "http://127.0.0.1:8765/whip of 'talkscope serve'. Add ?stream=ID to the URL to "
            "choose the stream id. Ends the session (DELETE) when the source ends or on Ctrl-C."
        ),
    )
    publish.add_argument("source", metavar="SOURCE", help="a path, URL or device: URI")
    publish.add_argument("--to", required=True, metavar="URL", help="the WHIP endpoint URL")
    publish.add_argument(
        "--token", default=None, help="bearer token (default: $TALKSCOPE_TOKEN if set)"
    )
    publish.add_argument("--loop", action="store_true", help="play a file source in a loop")
    publish.add_argument("--seconds", type=float, default=None, help="stop after this much media")
    from clients.watch import add_watch_parser

    add_watch_parser(commands)  # type: ignore[arg-type]  # _Parser is an ArgumentParser
    from pipelines.identity_cli import add_identity_parsers

    add_identity_parsers(commands)

    models = commands.add_parser(
        "models",
        help="list the sync models, their inputs and where their weights are looked for",
        description=(
            "For each sync model: its inputs and embedding size, whether trained weights are "
            "installed, where they are looked for and how to get them. Nothing is downloaded."
        ),
    )
    models.add_argument("--json", action="store_true", help="one JSON object per model")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI.

    Args:
        argv: arguments without the program name; ``sys.argv[1:]`` when None.

    Returns:
        The process exit code.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(message)s")
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            build_parser().print_help()
            return EXIT_USAGE
        if args.command == "inspect":
            return asyncio.run(_inspect(args))
        if args.command == "faces":
            return _faces(args)
        if args.command == "sync":
            return _sync(args)
        if args.command == "models":
            return _models(args)
        if args.command == "serve":
            return asyncio.run(_serve(args))
        if args.command == "publish":
            return asyncio.run(_publish(args))
        if args.command == "watch":
            from clients.watch import run_watch

            return run_watch(args)
        if args.command in ("enroll", "identify", "train"):
            return _identity(args)
        raise UsageError(f"unknown command {args.command!r}")
    except KeyboardInterrupt:
        print("talkscope: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except EngineError as error:
        _report(error, debug)
        return exit_code(error)
    except Exception as error:  # a bug: one line, and the traceback with --debug
        _report(error, debug)
        return EXIT_FAILURE


def _identity(args: argparse.Namespace) -> int:
    from pipelines import identity_cli

    if args.command == "enroll":
        return identity_cli.run_enroll(args)
    if args.command == "train":
        return identity_cli.run_train(args)
    return identity_cli.run_identify(
        args, lambda error, quiet: _report(error, args.debug, quiet=quiet)
    )


def exit_code(error: BaseException) -> int:
    """The exit code for an error: 2 for usage, input and unreachable sources, else 1."""
    if isinstance(error, UsageError | InputError | SourceUnavailable):
        return EXIT_USAGE
    return EXIT_FAILURE


def _report(error: BaseException, debug: bool, *, quiet: bool = False) -> None:
    """One line on stderr (none when ``quiet``); the traceback too with ``--debug``."""
    if debug:
        logging.error("talkscope failed", exc_info=error)
    if quiet:
        return
    kind = type(error).__name__
    print(f"talkscope: error: {error} [{kind}]", file=sys.stderr)


async def _inspect(args: argparse.Namespace) -> int:
    from engine.assets import demo_clip
    from pipelines.inspect import inspect_source

    sources = args.sources or [str(demo_clip())]
    worst = EXIT_OK
    for uri in sources:
        try:
            report = await inspect_source(
                uri, preset=args.preset, paced=args.paced, max_seconds=args.seconds
            )
        except EngineError as error:
            worst = max(worst, exit_code(error))
            if args.json:
                print(json.dumps({"source": uri, "error": str(error)}), flush=True)
            _report(error, args.debug, quiet=args.json)
            continue
        if args.json:
            print(json.dumps(report.to_json()), flush=True)
        else:
            print(_describe(report), flush=True)
    return worst


def _describe(report: InspectReport) -> str:
    data = report.to_json()
    size = "x".join(str(v) for v in data.get("video_size", [])) or "-"
    level = data.get("audio_rms_dbfs")
    lines = [
        f"{data['source']}",
        f"  video   {data['video_frames']} frames at 25 fps "
        f"({data['video_seconds']:.2f} s), {size}",
        f"  audio   {data['audio_seconds']:.2f} s at 16 kHz mono, level "
        + (f"{level:.1f} dBFS" if level is not None else "silent"),
        f"  mfcc    {data['mfcc_frames']} frames x 13 ({data['mfcc_preset']} preset)",
        f"  decoded in {data['seconds']:.2f} s ({data['realtime_factor']}x real time)",
    ]
    return "\n".join(lines)


def _faces(args: argparse.Namespace) -> int:
    # Heavy imports (OpenCV, LiteRT) happen here, before the event loop starts, not inside it.
    from engine.vision.stage import FaceConfig
    from engine.vision.tracker import TrackerConfig
    from pipelines.faces import analyse_faces

    if args.max_faces < 1:
        raise UsageError("--max-faces must be at least 1")
    if args.preview is not None and len(args.sources) > 1:
        raise UsageError("--preview takes one source")
    config = FaceConfig(tracker=TrackerConfig(max_faces=args.max_faces))
    return asyncio.run(_faces_all(args, config, analyse_faces))


async def _faces_all(
    args: argparse.Namespace,
    config: FaceConfig,
    analyse_faces: Callable[..., Awaitable[FacesReport]],
) -> int:
    worst = EXIT_OK
    for uri in args.sources:
        try:
            report = await analyse_faces(
                uri, config=config, preview=args.preview, max_seconds=args.seconds
            )
        except EngineError as error:
            worst = max(worst, exit_code(error))
            if args.json:
                print(json.dumps({"file": uri, "error": str(error)}), flush=True)
            _report(error, args.debug, quiet=args.json)
            continue
        if args.json:
            print(json.dumps({"file": uri, **report.to_json()}), flush=True)
        else:
            print(_describe_faces(report), flush=True)
    return worst


def _describe_faces(report: FacesReport) -> str:
    size = "x".join(str(v) for v in report.video_size) or "-"
    lines = [
        f"{report.source}",
        f"  {report.video_frames} frames at 25 fps, {size}, "
        f"{len(report.tracks)} track(s), {report.ms_per_frame} ms/frame",
    ]
    if not report.tracks:
        lines.append("  no face found")
    for track in report.tracks:
        share = track.frames / report.video_frames if report.video_frames else 0.0
        box = ", ".join(f"{v:.0f}" for v in track.box)
        lines.append(
            f"  track {track.track_id}: frames {track.first_frame}-{track.last_frame} "
            f"({track.frames} frames, {share:.0%}), {track.first_s:.2f}-{track.last_s:.2f} s, "
            f"median box [{box}]"
        )
    if report.preview:
        lines.append(f"  preview written to {report.preview}")
    return "\n".join(lines)


def expand_media_paths(paths: Sequence[str]) -> list[str]:
    """Each path as given, except that a folder stands for its media files, sorted by path.

    Sub-folders are searched too (a dataset's clips are often grouped by source); files are
    taken by suffix (:data:`MEDIA_SUFFIXES`), hidden ones skipped. Paths that are not folders
    are kept as they are (files, URLs).

    Raises:
        UsageError: a folder holds no media file.
    """
    files: list[str] = []
    for text in paths:
        folder = Path(text)
        if not folder.is_dir():
            files.append(text)
            continue
        media = sorted(
            str(child)
            for child in folder.rglob("*")
            if child.is_file()
            and child.suffix.lower() in MEDIA_SUFFIXES
            and not any(part.startswith(".") for part in child.relative_to(folder).parts)
        )
        if not media:
            raise UsageError(f"{text}: no media files in this folder")
        files.extend(media)
    return files


class _ProgressBar:
    """One self-rewriting line on stderr: files and windows done. Drawn at most every 0.1 s."""

    def __init__(self, enabled: bool, stream: TextIO | None = None, interval_s: float = 0.1):
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.interval_s = interval_s
        self._last_s = 0.0
        self._width = 0

    def show(self, progress: SyncProgress) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        finished = progress.files_done >= progress.files_total
        if now - self._last_s < self.interval_s and not finished:
            return
        self._last_s = now
        if progress.files_total == 1 and progress.windows_total:
            share = progress.windows_done / progress.windows_total
        else:
            share = progress.files_done / max(1, progress.files_total)
        filled = round(24 * min(1.0, share))
        line = (
            f"[{'#' * filled}{'.' * (24 - filled)}] files {progress.files_done}/"
            f"{progress.files_total}  windows {progress.windows_done}/{progress.windows_total}"
        )
        self.stream.write("\r" + line.ljust(self._width))
        self.stream.flush()
        self._width = len(line)

    def clear(self) -> None:
        if self.enabled and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0


def _sync(args: argparse.Namespace) -> int:
    # Before the event loop starts: the heavy imports (torch, onnxruntime, OpenCV, LiteRT),
    # loading the weights and exporting them to ONNX all block for a second or more.
    from engine.models.loading import model_spec, resolve_weights, tower_backends
    from pipelines.sync import SyncRunner

    if args.jobs < 1:
        raise UsageError("--jobs must be at least 1")
    providers = tuple(name.strip() for name in args.providers.split(",") if name.strip())
    if not providers:
        raise UsageError("--providers names no provider")
    files = expand_media_paths(args.paths)
    spec = model_spec(args.model)
    resolved = resolve_weights(spec, args.weights)
    backends = tower_backends(resolved, backend=args.backend, providers=providers)
    runner = SyncRunner(spec, backends)
    header = f"{resolved.describe()} on {args.backend} [{', '.join(runner.providers)}]"
    return asyncio.run(_sync_all(args, files, runner, header))


async def _sync_all(
    args: argparse.Namespace, files: list[str], runner: SyncRunner, header: str
) -> int:
    from pipelines.sync import task_group

    bar = _ProgressBar(enabled=args.progress or sys.stderr.isatty())
    progress = runner.progress
    progress.files_total, progress.listener = len(files), bar.show
    outcomes: list[FileSyncReport | EngineError | None] = [None] * len(files)
    printed = 0
    worst = EXIT_OK

    def print_ready() -> None:
        """Print the finished files in the order given, as soon as those before them are."""
        nonlocal printed, worst
        while printed < len(files) and outcomes[printed] is not None:
            outcome, uri = outcomes[printed], files[printed]
            bar.clear()
            if isinstance(outcome, EngineError):
                worst = max(worst, exit_code(outcome))
                if args.json:
                    print(json.dumps({"file": uri, "error": str(outcome)}), flush=True)
                _report(outcome, args.debug, quiet=args.json)
            elif outcome is not None:
                text = json.dumps(outcome.to_json()) if args.json else _describe_sync(outcome)
                print(text, flush=True)
            printed += 1

    async with runner:
        if not args.json:
            print(header, flush=True)
        pending = iter(enumerate(files))

        async def worker() -> None:
            for index, uri in pending:
                try:
                    outcomes[index] = await runner.analyse_file(uri, max_seconds=args.seconds)
                except EngineError as error:
                    outcomes[index] = error
                progress.update(files_done=1)
                print_ready()

        async with task_group() as group:
            for number in range(min(args.jobs, len(files))):
                group.create_task(worker(), name=f"sync-job-{number}")
    bar.clear()
    return worst


async def _publish(args: argparse.Namespace) -> int:
    import os

    from pipelines.publish import PublishOptions, publish

    if args.seconds is not None and args.seconds <= 0:
        raise UsageError(f"--seconds must be positive, got {args.seconds}")
    token = args.token if args.token is not None else os.environ.get("TALKSCOPE_TOKEN")
    options = PublishOptions(args.source, args.to, token or None, args.loop, args.seconds)
    return await publish(options)


async def _serve(args: argparse.Namespace) -> int:
    import os

    from engine.assets import demo_clip
    from pipelines.live import LiveConfig
    from pipelines.serve import ServeOptions, serve

    if args.window_s < 1.0:
        raise UsageError(f"--window-s must be at least 1 s, got {args.window_s}")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be 0..65535, got {args.port}")
    if args.max_publishers < 1:
        raise UsageError(f"--max-publishers must be at least 1, got {args.max_publishers}")
    sources = list(args.source)
    loop = args.loop
    if not sources and not args.no_demo:
        sources, loop = [f"demo={demo_clip()}"], True
    token = args.token if args.token is not None else os.environ.get("TALKSCOPE_TOKEN")
    gallery = _serve_gallery(args)
    config = LiveConfig(
        window_s=args.window_s,
        loop_files=loop,
        providers=args.providers,
        identity=not args.no_identity,
        gallery=gallery,
    )
    options = ServeOptions(
        sources,
        args.host,
        args.port,
        token or None,
        args.exit_when_done,
        config,
        whip=not args.no_whip,
        max_publishers=args.max_publishers,
        ice_servers=tuple(args.ice_server),
    )
    return await serve(options)


def _serve_gallery(args: argparse.Namespace) -> Path | None:
    """The gallery ``serve`` names people from.

    ``--gallery`` (which must exist), else the default one when it exists, else none.
    """
    from engine.identity.gallery import Gallery, default_gallery_path

    if args.no_identity:
        return None
    path = args.gallery if args.gallery is not None else default_gallery_path()
    if not path.exists():
        if args.gallery is not None:
            raise UsageError(f"no gallery at {path}; enroll someone first (talkscope enroll)")
        return None
    with Gallery(path, create=False):  # a corrupt or foreign file stops here, exit 2
        pass
    return Path(path)


def _describe_sync(report: FileSyncReport) -> str:
    lines = [
        f"{report.source}",
        f"  {report.video_frames} frames at 25 fps, {len(report.tracks)} track(s), "
        f"{report.windows} windows, {report.seconds:.2f} s",
    ]
    if not report.tracks:
        lines.append("  no face found")
        return "\n".join(lines)
    lines.append(
        f"  {'track':>5}  {'offset':<18} {'confidence':>10} {'min dist':>9} {'windows':>7}  box"
    )
    for track in report.tracks:
        box = "[" + ", ".join(f"{v:.0f}" for v in track.box) + "]"
        if track.offset_frames is None or track.offset_ms is None:
            lines.append(
                f"  {track.track_id:>5}  {'-':<18} {'-':>10} {'-':>9} {track.frames:>7}  {box}"
            )
            lines.append(f"         no estimate: {track.reason}")
            continue
        offset = f"{track.offset_frames:+d} fr ({track.offset_ms:+.0f} ms)"
        lines.append(
            f"  {track.track_id:>5}  {offset:<18} {track.confidence:>10.3f} "
            f"{track.min_dist:>9.3f} {track.frames:>7}  {box}"
        )
    return "\n".join(lines)


def _models(args: argparse.Namespace) -> int:
    from engine.models.loading import (
        cli_name,
        how_to_get,
        installed_weights,
        is_published_file,
        looked_for,
    )
    from engine.models.spec import MODEL_SPECS

    for name in sorted(MODEL_SPECS, key=lambda n: cli_name(MODEL_SPECS[n]) != SYNC_MODELS[0]):
        spec = MODEL_SPECS[name]
        installed = installed_weights(spec)
        published = None if installed is None else is_published_file(spec, installed)
        data: dict[str, Any] = {
            "model": cli_name(spec),
            "name": spec.name,
            "description": spec.description,
            "inputs": {tower.tower: _tensor_json(tower.input) for tower in spec.towers},
            "embedding_size": spec.embedding_size,
            "mfcc_preset": spec.window.mfcc_preset,
            "installed": installed is not None,
            "weights": None if installed is None else str(installed),
            "published": published,
            "looked_for": looked_for(spec),
            "source": spec.weights.source if spec.weights else None,
            "git_blob_sha1": spec.weights.git_blob_sha1 if spec.weights else None,
            "how_to_get": how_to_get(spec),
        }
        print(json.dumps(data) if args.json else _describe_model(spec, data), flush=True)
    return EXIT_OK


def _tensor_json(tensor: TensorSpec) -> dict[str, Any]:
    return {
        "name": tensor.name,
        "shape": ["batch", *tensor.shape],
        "dtype": tensor.dtype,
        "layout": tensor.layout,
    }


def _describe_model(spec: ModelSpec, data: dict[str, Any]) -> str:
    lines = [f"{data['model']}  {spec.description}"]
    for tower in spec.towers:
        shape = ", ".join(map(str, tower.input.shape))
        lines.append(
            f"  {tower.tower + ' in':<10}{tower.input.name} (batch, {shape}) {tower.input.dtype}"
        )
    lines.append(f"  {'embedding':<10}{spec.embedding_size} floats per tower, Euclidean distance")
    lines.append(f"  {'mfcc':<10}{spec.window.mfcc_preset} preset, 20 steps per 5 frames")
    if data["installed"]:
        check = {True: " (the published file)", False: " (NOT the published file)", None: ""}
        lines.append(f"  {'weights':<10}installed: {data['weights']}{check[data['published']]}")
    else:
        looked = ", ".join(data["looked_for"])
        lines.append(f"  {'weights':<10}not installed (looked for {looked})")
        lines.append(f"  {'get them':<10}{data['how_to_get']}")
    return "\n".join(lines)
