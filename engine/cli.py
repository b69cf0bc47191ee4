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
from typing import TYPE_CHECKING

from engine import __version__
from engine.core.errors import EngineError, InputError, SourceUnavailable, UsageError
from engine.dsp.mfcc import PRESETS

if TYPE_CHECKING:
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
