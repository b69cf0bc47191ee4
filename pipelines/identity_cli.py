"""The identity commands of the CLI: ``enroll``, ``identify`` and ``train pins``."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from engine.core.errors import EngineError, UsageError

PINS_OUT = Path(__file__).resolve().parents[1] / "engine" / "models" / "weights" / "pins"
"""Where ``talkscope train pins`` writes the towers by default: the package's own."""


def add_identity_parsers(commands: Any) -> None:
    """Add ``enroll``, ``identify`` and ``train`` to the CLI's sub-commands."""
    enroll = commands.add_parser(
        "enroll",
        help="add a person (face and voice) to the identity gallery",
        description=(
            "Embed NAME's face (the one face of an image, or the longest face track of a clip) "
            "and voice (every speech segment of a clip) with the PINs towers' unimodal encoders "
            "and store them in the SQLite gallery; identity events then carry the name. "
            "Enrolling a name again adds to it."
        ),
    )
    enroll.add_argument("name", metavar="NAME", help="the person's name (1-100 characters)")
    enroll.add_argument("--face", metavar="IMAGE_OR_CLIP", help="an image or a video of the face")
    enroll.add_argument("--voice", metavar="CLIP", help="audio or video with the person speaking")
    _gallery_option(enroll)
    enroll.add_argument("--json", action="store_true", help="print the result as JSON")

    identify = commands.add_parser(
        "identify",
        help="who is in video files: identity ids, enrolled names, voice-face match",
        description=(
            "Decode each file once, track faces, cut speech by the VAD, embed faces and voices "
            "with the PINs towers and run the identity engine (the live engine's). Prints per "
            "track the identity id, enrolled name, face score and voice-face match, and the "
            "voices heard with no face on screen."
        ),
    )
    identify.add_argument("paths", nargs="+", metavar="PATH", help="file or URL")
    _gallery_option(identify)
    identify.add_argument("--json", action="store_true", help="one JSON object per file")

    train = commands.add_parser(
        "train", help="train talkscope's models (needs the dev extra and ../shared)"
    )
    kinds = train.add_subparsers(dest="train_model", parser_class=type(train))
    pins = kinds.add_parser("pins", help="train the PINs heads and write the towers")
    add_train_pins_arguments(pins)


def add_train_pins_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``talkscope train pins``."""
    parser.add_argument(
        "--data",
        type=Path,
        default=Path("..") / "shared" / "data",
        help="the shared clips (clips.csv and av/)",
    )
    parser.add_argument(
        "--models",
        type=Path,
        default=Path("..") / "shared" / "models",
        help="the pretrained trunks (sface/, resemblyzer/)",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(".cache") / "pins",
        help="decoded tracks and the scratch model",
    )
    parser.add_argument("--out", type=Path, default=PINS_OUT, help="where the towers go")
    parser.add_argument("--steps", type=int, default=1500, help="head training steps")
    parser.add_argument(
        "--scratch-seconds",
        type=float,
        default=240.0,
        help="CPU seconds for the from-scratch networks (0 skips them)",
    )
    parser.add_argument("--seed", type=int, default=0)


def _gallery_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--gallery",
        type=Path,
        default=None,
        metavar="DB",
        help="the SQLite gallery (default: $TALKSCOPE_GALLERY, else ~/.local/share/talkscope/)",
    )


def gallery_path(given: Path | None) -> Path:
    """The gallery file a command uses."""
    from engine.identity.gallery import default_gallery_path

    return given if given is not None else default_gallery_path()


def run_enroll(args: argparse.Namespace) -> int:
    """``talkscope enroll``."""
    from engine.identity.gallery import Gallery
    from pipelines.identify import enroll

    if args.face is None and args.voice is None:
        raise UsageError("enroll needs --face IMAGE_OR_CLIP and/or --voice CLIP")
    with Gallery(gallery_path(args.gallery)) as gallery:
        result = asyncio.run(enroll(args.name, gallery, face=args.face, voice=args.voice))
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        print(
            f"enrolled {result['name']!r}: {result['faces']} face and {result['voices']} voice "
            f"embeddings in {result['gallery']}",
            flush=True,
        )
    return 0


def run_identify(args: argparse.Namespace, report_error: Any) -> int:
    """``talkscope identify``; ``report_error(error, quiet)`` prints one failure."""
    from engine.identity.gallery import Gallery
    from engine.identity.models import load_config
    from pipelines.identify import IdentifyRunner, gallery_people

    path = gallery_path(args.gallery)
    if args.gallery is not None and not path.exists():
        raise UsageError(f"no gallery at {path}; enroll someone first (talkscope enroll)")
    people = []
    if path.exists():
        with Gallery(path, create=False) as gallery:
            people = gallery_people(gallery)
    runner = IdentifyRunner(load_config(), people)
    return asyncio.run(_identify_all(args, runner, report_error))


async def _identify_all(args: argparse.Namespace, runner: Any, report_error: Any) -> int:
    from engine.cli import exit_code

    worst = 0
    async with runner:
        for uri in args.paths:
            try:
                report = await runner.identify_file(uri)
            except EngineError as error:
                worst = max(worst, exit_code(error))
                if args.json:
                    print(json.dumps({"file": uri, "error": str(error)}), flush=True)
                report_error(error, args.json)
                continue
            print(json.dumps(report.to_json()) if args.json else describe(report), flush=True)
    return worst


def describe(report: Any) -> str:
    """A file's identities, readably."""
    lines = [f"{report.file}: {report.identities} identities ({report.seconds:.1f} s)"]
    for t in report.tracks:
        name = t.name or "-"
        match = "-" if t.voice_match is None else f"{t.voice_match:.2f}"
        ident = "-" if t.identity_id is None else str(t.identity_id)
        lines.append(
            f"  track {t.track_id:3d}  identity {ident:>3s}  name {name:12s}  voice match "
            f"{match:>5s}  {'speaking' if t.speaking else 'silent':8s}  box {t.box}"
        )
    for v in report.voices:
        lines.append(
            f"  voice off screen: identity {v['identity_id']}  name {v['name'] or '-'}  "
            f"{v['evidence_s']:.1f} s"
        )
    return "\n".join(lines)


def run_train(args: argparse.Namespace) -> int:
    """``talkscope train pins``."""
    if args.train_model != "pins":
        raise UsageError("talkscope train: choose a model to train: pins")
    from pipelines.train_pins import run

    report = run(args)
    print(json.dumps(report, indent=2), file=sys.stdout, flush=True)
    return 0
