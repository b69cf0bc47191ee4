"""Training and evaluation data for the sync model: real clips decoded once into a cache.

Each clip of ``clips.csv`` is run through :func:`pipelines.features.extract_clip` (the engine's own
sources, MFCC and face stages) and its longest face track is stored as one ``.npz``: the grey
112×112 face crops ``(T, 112, 112)`` uint8 (SyncNet-lite's input), their timestamps, the lip
points (for the model-free baseline), and the clip's MFCC (``syncnet`` preset) with its start
time. The split comes from the ``split`` column of ``clips.csv`` (by
identity, fixed): train on ``train``, report on ``test``.

Run: ``python -m pipelines.sync_data --data ../shared/data --cache CACHE [--split train test]``.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from engine.core.errors import EngineError
from pipelines.features import extract_clip

MIN_FRAMES = 25


@dataclass(frozen=True)
class ClipRow:
    """One row of ``clips.csv``."""

    path: Path
    identity: str
    split: str


@dataclass
class CachedClip:
    """One clip's longest track and its MFCC, as stored in the cache."""

    name: str
    identity: str
    split: str
    face112: npt.NDArray[np.uint8]
    pts_ns: npt.NDArray[np.int64]
    lips: npt.NDArray[np.float32]
    mfcc: npt.NDArray[np.float32]
    mfcc_start_ns: int


def read_index(data: Path, splits: set[str]) -> list[ClipRow]:
    """The clips of ``data/clips.csv`` in the given splits."""
    with (data / "clips.csv").open(newline="") as handle:
        return [
            ClipRow(data / row["path"], row["identity"], row["split"])
            for row in csv.DictReader(handle)
            if row["split"] in splits
        ]


def cache_name(row: ClipRow, data: Path) -> str:
    """The cache file name of a clip (its path under ``data`` with ``/`` replaced)."""
    return str(row.path.relative_to(data)).replace("/", "__") + ".npz"


async def prepare(row: ClipRow, out: Path) -> bool:
    """Decode one clip into ``out``; False when it has no usable face track or audio."""
    features = await extract_clip(str(row.path), preset="syncnet")
    tracks = [t for t in features.tracks if t.pts_ns.size >= MIN_FRAMES]
    if not tracks or features.mfcc.shape[0] < 20:
        return False
    track = max(tracks, key=lambda t: t.pts_ns.size)
    np.savez(
        out,
        identity=row.identity,
        split=row.split,
        face112=track.face112,
        pts_ns=track.pts_ns,
        lips=track.lips,
        mfcc=features.mfcc,
        mfcc_start_ns=features.mfcc_start_ns,
    )
    return True


def load(path: Path) -> CachedClip:
    """Read one cached clip."""
    with np.load(path) as data:
        return CachedClip(
            name=path.name.removesuffix(".npz"),
            identity=str(data["identity"]),
            split=str(data["split"]),
            face112=data["face112"],
            pts_ns=data["pts_ns"],
            lips=data["lips"],
            mfcc=data["mfcc"],
            mfcc_start_ns=int(data["mfcc_start_ns"]),
        )


def load_split(cache: Path, split: str) -> list[CachedClip]:
    """Every cached clip of one split, sorted by name."""
    clips = [load(p) for p in sorted(cache.glob("*.npz"))]
    return [c for c in clips if c.split == split]


async def prepare_all(data: Path, cache: Path, splits: set[str]) -> int:
    """Fill the cache (clips already there are kept); returns the number of failures."""
    rows = read_index(data, splits)
    failures = 0
    for number, row in enumerate(rows, 1):
        out = cache / cache_name(row, data)
        if out.exists():
            continue
        started = time.perf_counter()
        try:
            kept = await prepare(row, out)
        except EngineError as error:
            print(f"[{number}/{len(rows)}] {row.path.name}: skipped: {error}", file=sys.stderr)
            failures += 1
            continue
        took = time.perf_counter() - started
        state = "cached" if kept else "no usable track"
        print(f"[{number}/{len(rows)}] {row.path.name}: {state} ({took:.1f} s)", file=sys.stderr)
    return failures


def main(argv: list[str] | None = None) -> int:
    """Command line: fill the cache for the chosen splits."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--data", type=Path, required=True, help="folder with clips.csv")
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--split", nargs="+", default=["train", "test"])
    args = parser.parse_args(argv)
    if not (args.data / "clips.csv").exists():
        print(f"no clips.csv in {args.data}", file=sys.stderr)
        return 2
    args.cache.mkdir(parents=True, exist_ok=True)
    failures = asyncio.run(prepare_all(args.data, args.cache, set(args.split)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
