"""``talkscope watch URL``: print the events of a talkscope event server as they come.

One readable line per event, or with ``--json`` the server's JSON, one object per line::

       12.48s  cam1       speaker     track 2 [815,144,1011,338] score 0.91
       12.60s  cam1       sync        track 2 -120 ms (-3 frames) conf 4.1

Exit codes: 0 when the server closes the connection normally, 1 when the connection breaks,
2 for a bad URL, a refused token or an unreachable server (one line on stderr), 130 on Ctrl-C.
The token comes from ``--token`` or the ``TALKSCOPE_TOKEN`` environment variable (which keeps
it out of process listings).

``engine.cli`` wires :func:`add_watch_parser` and :func:`run_watch` into ``talkscope``;
``python -m clients.watch URL ...`` runs the same command on its own (see :func:`main`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from clients.talkscope_client import (
    BadURL,
    ClientError,
    ServerUnreachable,
    TalkscopeClient,
    TokenRefused,
)
from engine.events import EVENT_TYPES

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
TOKEN_ENV = "TALKSCOPE_TOKEN"


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", metavar="URL", help="ws://HOST:PORT of a talkscope event server")
    parser.add_argument(
        "--token", default=None, help=f"the server's token (default: ${TOKEN_ENV} when set)"
    )
    parser.add_argument("--json", action="store_true", help="print each event's JSON on a line")
    parser.add_argument(
        "--stream",
        dest="streams",
        action="extend",
        nargs="+",
        metavar="ID",
        help="only these streams (repeatable; default all)",
    )
    parser.add_argument(
        "--type",
        dest="types",
        action="extend",
        nargs="+",
        choices=EVENT_TYPES,
        metavar="TYPE",
        help=f"only these event types (repeatable; default all): {', '.join(EVENT_TYPES)}",
    )


def add_watch_parser(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add the ``watch`` sub-command to the ``talkscope`` sub-parsers.

    Args:
        commands: what ``ArgumentParser.add_subparsers`` returned.

    Returns:
        The ``watch`` parser (its namespace has ``url``, ``token``, ``json``, ``streams`` and
        ``types``).
    """
    watch = commands.add_parser(
        "watch",
        help="print the events of a talkscope event server as they come",
        description=(
            "Connect to a talkscope event server and print one line per event (or its JSON "
            "with --json) until the server closes. Exit 0 when it closes normally, 2 for a bad "
            "URL, a refused token or an unreachable server."
        ),
    )
    _add_arguments(watch)
    return watch


def run_watch(args: argparse.Namespace) -> int:
    """Run ``watch`` with parsed arguments.

    Args:
        args: from the parser of :func:`add_watch_parser` (``args.debug`` is used when there).

    Returns:
        The exit code: 0 normal closure, 1 connection lost, 2 bad URL / refused token /
        unreachable server, 130 interrupted.
    """
    debug = bool(getattr(args, "debug", False))
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    try:
        asyncio.run(_watch(args.url, token, args.streams, args.types, as_json=args.json))
    except KeyboardInterrupt:
        print("talkscope: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`talkscope watch URL | head`): stop quietly, and keep Python
        # from complaining again when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except (BadURL, TokenRefused, ServerUnreachable) as error:
        _report(error, debug)
        return EXIT_USAGE
    except ClientError as error:
        _report(error, debug)
        return EXIT_FAILURE if error.retryable else EXIT_USAGE
    return EXIT_OK


def _report(error: BaseException, debug: bool) -> None:
    if debug:
        logging.error("talkscope watch failed", exc_info=error)
    print(f"talkscope: error: {error} [{type(error).__name__}]", file=sys.stderr)


async def _watch(
    url: str,
    token: str | None,
    streams: Sequence[str] | None,
    types: Sequence[str] | None,
    *,
    as_json: bool,
) -> None:
    async with TalkscopeClient(url, token) as client:
        print(json.dumps(client.hello) if as_json else describe(client.hello), flush=True)
        async for event in client.events(streams=streams, types=types):
            print(json.dumps(event) if as_json else describe(event), flush=True)


def describe(event: Mapping[str, Any]) -> str:
    """One readable line for an event: media time, stream, type, then what it says.

    Events of a newer schema (unknown types or fields) are shown as their JSON.
    """
    pts_ns = event.get("pts_ns")
    when = f"{pts_ns / 1e9:.2f}s" if isinstance(pts_ns, int) else "-"
    stream = event.get("stream_id") or "-"
    kind = str(event.get("type", "?"))
    try:
        details = _details(kind, event)
    except (KeyError, TypeError, ValueError):
        details = json.dumps(event)
    return f"{when:>9}  {stream:<10} {kind:<11} {details}".rstrip()


def _box(box: Any) -> str:
    return "[" + ",".join(f"{v:.0f}" for v in box) + "]" if box is not None else "-"


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value:.0f}"


def _details(kind: str, e: Mapping[str, Any]) -> str:
    if kind == "stream":
        message = f": {e['message']}" if e["message"] else ""
        return f"{e['state']} {e['source']}{message}"
    if kind == "track_start":
        return f"track {e['track_id']} {_box(e['box'])}"
    if kind == "track_end":
        return f"track {e['track_id']} {_box(e['box'])} after {e['frames']} frames"
    if kind == "speaker":
        score = f"score {e['score']:.2f}"
        if e["state"] == "speaking":
            return f"track {e['track_id']} {_box(e['box'])} {score}"
        if e["state"] == "offscreen":
            return f"off-screen voice, {score}"
        return f"silent, {score}"
    if kind == "sync":
        if e["state"] != "ok" or e["offset_ms"] is None:
            return f"track {e['track_id']} unknown: {e['reason'] or 'no estimate'}"
        confidence = "-" if e["confidence"] is None else f"{e['confidence']:.1f}"
        return (
            f"track {e['track_id']} {e['offset_ms']:+.0f} ms ({e['offset_frames']:+d} frames) "
            f"conf {confidence}"
        )
    if kind == "identity":
        who = e["name"] or f"identity {e['identity_id']}"
        where = f"track {e['track_id']}" if e["track_id"] is not None else "off-screen voice"
        face = "" if e["face_score"] is None else f", face {e['face_score']:.2f}"
        voice = "" if e["voice_match"] is None else f", voice match {e['voice_match']:.2f}"
        return f"{where} is {who}{face}{voice} ({e['evidence_s']:.1f} s)"
    if kind == "stats":
        latency = e["latency_ms"]
        drops = sum(e["drops"].values())
        deepest = max(e["queues"].values(), default=0)
        return (
            f"latency p50 {_ms(latency['p50'])} p95 {_ms(latency['p95'])} "
            f"p99 {_ms(latency['p99'])} ms, deepest queue {deepest}, drops {drops}"
        )
    if kind == "hello":
        streams = ", ".join(e["streams"]) or "none yet"
        return f"{e['server']}, streams: {streams}"
    if kind == "subscribed":
        streams = ", ".join(e["streams"]) if e["streams"] is not None else "all"
        events = ", ".join(e["events"]) if e["events"] is not None else "all"
        return f"streams {streams}; events {events}"
    if kind == "dropped":
        return f"{e['count']} event(s) lost: this client read too slowly"
    if kind == "error":
        return f"{e['code']}: {e['message']}"
    if kind == "pong":
        return ""
    raise ValueError(kind)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``watch`` on its own: ``python -m clients.watch URL [options]``.

    Args:
        argv: arguments without the program name; ``sys.argv[1:]`` when None.

    Returns:
        The exit code (see :func:`run_watch`; 2 for bad arguments too).
    """
    parser = argparse.ArgumentParser(
        prog="python -m clients.watch", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    _add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse: --help (0) or bad arguments (2, usage printed)
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    level = logging.DEBUG if args.debug else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s")
    return run_watch(args)


if __name__ == "__main__":
    sys.exit(main())
