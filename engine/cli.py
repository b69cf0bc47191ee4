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
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from engine import __version__
from engine.core.errors import EngineError, InputError, SourceUnavailable, UsageError
from engine.dsp.mfcc import PRESETS

if TYPE_CHECKING:
    from pipelines.faces import FacesReport
    from pipelines.inspect import InspectReport

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


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
            return asyncio.run(_faces(args))
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


async def _faces(args: argparse.Namespace) -> int:
    from engine.vision.stage import FaceConfig
    from engine.vision.tracker import TrackerConfig
    from pipelines.faces import analyse_faces

    if args.max_faces < 1:
        raise UsageError("--max-faces must be at least 1")
    if args.preview is not None and len(args.sources) > 1:
        raise UsageError("--preview takes one source")
    config = FaceConfig(tracker=TrackerConfig(max_faces=args.max_faces))
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
