"""Test scenes built from real clips: faces side by side, whose audio takes turns.

``python -m pipelines.scenes LEFT RIGHT --out scene.mp4 [--switch-s 3] [--seconds 18]`` writes an
H.264/AAC file in which each clip fills one square tile of the picture (both keep moving their
lips) and the sound is the *left* clip's own audio for the first ``switch_s`` seconds, then the
right one's, and so on, each clip's audio at its own time (so the talker's lips match the sound
and the other face moves its lips silently). The ground truth, who speaks when, comes back as
:class:`Scene`. Used by the integration tests, the latency benchmark and the demo source.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
import numpy.typing as npt

from engine.core.errors import InputError

FPS = 25
SAMPLE_RATE_HZ = 16_000


@dataclass(frozen=True)
class Scene:
    """What a built scene holds.

    Attributes:
        path: the file.
        tiles: the box ``[x0, y0, x1, y1]`` of each clip's tile, in order.
        turns: ``(start_s, end_s, tile)``: who has the sound when.
        seconds: the scene's length.
    """

    path: Path
    tiles: list[list[int]]
    turns: list[tuple[float, float, int]]
    seconds: float

    def speaker_at(self, t_s: float) -> int | None:
        """The tile whose audio plays at ``t_s`` (None outside the scene)."""
        for start, end, tile in self.turns:
            if start <= t_s < end:
                return tile
        return None

    def speaker_right_share(self, events: list[dict[str, Any]], settle_s: float = 0.5) -> float:
        """Share of frames whose latest ``speaker`` event names the tile that has the sound.

        Frames within ``settle_s`` after a switch are not counted; a frame's speaker is the last
        ``speaker`` event at or before its timestamp, right when its box centre is in the tile.
        """
        speakers = sorted((e for e in events if e["type"] == "speaker"), key=lambda e: e["pts_ns"])
        right = counted = 0
        for frame in range(round(self.seconds * FPS)):
            t = frame / FPS
            turn = next(x for x in self.turns if x[0] <= t < x[1])
            if t - turn[0] < settle_s:
                continue
            said = [e for e in speakers if e["pts_ns"] <= round(t * 1e9)]
            box = said[-1]["box"] if said and said[-1]["track_id"] is not None else None
            tile = self.tiles[turn[2]]
            counted += 1
            right += box is not None and tile[0] <= (box[0] + box[2]) / 2 < tile[2]
        return right / counted if counted else 0.0


def _video(path: Path, frames: int, side: int, start_s: float = 0.0) -> list[npt.NDArray[np.uint8]]:
    """``frames`` pictures at 25 fps from ``start_s``, resized to ``side`` squares.

    Each picture is the one nearest its time on the 25 fps grid.
    """
    out: list[npt.NDArray[np.uint8]] = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            if frame.pts is None or frame.time_base is None:
                continue
            t = float(frame.pts * frame.time_base) - start_s
            while len(out) < frames and len(out) / FPS <= t + 0.5 / FPS:
                rgb = frame.to_ndarray(format="rgb24")
                out.append(_square(rgb, side))
            if len(out) >= frames:
                break
    if len(out) < frames:
        raise InputError(f"{path}: only {len(out) / FPS:.1f} s of video, {frames / FPS} s needed")
    return out


def _square(rgb: npt.NDArray[np.uint8], side: int) -> npt.NDArray[np.uint8]:
    height, width = rgb.shape[:2]
    crop = min(height, width)
    y0, x0 = (height - crop) // 2, (width - crop) // 2
    square = rgb[y0 : y0 + crop, x0 : x0 + crop]
    resized: npt.NDArray[np.uint8] = cv2.resize(square, (side, side), interpolation=cv2.INTER_AREA)
    return resized


def _audio(path: Path, samples: int, start_s: float = 0.0) -> npt.NDArray[np.int16]:
    """``samples`` samples of the clip's audio from ``start_s``, 16 kHz mono."""
    resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE_HZ)
    parts = []
    with av.open(str(path)) as container:
        for frame in container.decode(audio=0):
            parts.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
    pcm = np.concatenate(parts) if parts else np.zeros(0, np.int16)
    pcm = pcm[round(start_s * SAMPLE_RATE_HZ) :]
    if pcm.size < samples:
        raise InputError(f"{path}: only {pcm.size / SAMPLE_RATE_HZ:.1f} s of audio")
    return pcm[:samples].astype(np.int16)


def build_scene(
    clips: list[Path], out: Path, *, switch_s: float = 3.0, seconds: float = 18.0, side: int = 256
) -> Scene:
    """Write a side-by-side scene of ``clips`` with their audio taking turns (module docstring).

    Raises:
        InputError: a clip is shorter than ``seconds`` or has no audio or video.
    """
    frames = round(seconds * FPS)
    samples = round(seconds * SAMPLE_RATE_HZ)
    videos = [_video(Path(c), frames, side) for c in clips]
    audios = [_audio(Path(c), samples) for c in clips]
    turns, mixed = [], np.zeros(samples, dtype=np.int16)
    start = 0.0
    while start < seconds:
        end = min(seconds, start + switch_s)
        tile = len(turns) % len(clips)
        a, b = round(start * SAMPLE_RATE_HZ), round(end * SAMPLE_RATE_HZ)
        mixed[a:b] = audios[tile][a:b]
        turns.append((start, end, tile))
        start = end
    _write(out, [np.concatenate(row, axis=1) for row in zip(*videos, strict=True)], mixed)
    tiles = [[i * side, 0, (i + 1) * side, side] for i in range(len(clips))]
    return Scene(out, tiles, turns, seconds)


@dataclass(frozen=True)
class Shot:
    """One shot of a sequence.

    ``video`` from ``start_s`` for ``seconds``, with the sound of ``audio`` (default: the same
    clip) from ``audio_start_s`` (default: ``start_s``); a shot with no video is an empty
    picture (nobody on screen), silent unless it has ``audio``.
    """

    video: Path | None
    start_s: float
    seconds: float
    audio: Path | None = None
    audio_start_s: float | None = None


def build_sequence(shots: list[Shot], out: Path, *, side: int = 256) -> list[tuple[float, float]]:
    """Write the shots one after the other (hard cuts); returns each shot's ``(start, end)``.

    Raises:
        InputError: a clip is too short for its shot.
    """
    pictures: list[npt.NDArray[np.uint8]] = []
    sound: list[npt.NDArray[np.int16]] = []
    spans, at = [], 0.0
    for shot in shots:
        frames = round(shot.seconds * FPS)
        samples = round(shot.seconds * SAMPLE_RATE_HZ)
        if shot.video is None:
            pictures.extend(np.full((side, side, 3), 16, np.uint8) for _ in range(frames))
        else:
            pictures.extend(_video(shot.video, frames, side, shot.start_s))
        heard = shot.audio or shot.video
        audio_start = shot.start_s if shot.audio_start_s is None else shot.audio_start_s
        if heard is None:
            sound.append(np.zeros(samples, np.int16))
        else:
            sound.append(_audio(heard, samples, audio_start))
        spans.append((at, at + shot.seconds))
        at += shot.seconds
    _write(out, pictures, np.concatenate(sound))
    return spans


def _write(out: Path, pictures: list[npt.NDArray[np.uint8]], pcm: npt.NDArray[np.int16]) -> None:
    with av.open(str(out), "w") as container:
        video = container.add_stream("libx264", rate=FPS)
        video.height, video.width = pictures[0].shape[:2]
        video.pix_fmt = "yuv420p"
        video.options = {"crf": "23", "preset": "veryfast", "g": "25"}
        audio = container.add_stream("aac", rate=SAMPLE_RATE_HZ)
        audio.layout = "mono"
        for index, rgb in enumerate(pictures):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = index, Fraction(1, FPS)
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        for start in range(0, pcm.size, 1024):
            chunk = av.AudioFrame.from_ndarray(
                pcm[None, start : start + 1024], format="s16", layout="mono"
            )
            chunk.sample_rate = SAMPLE_RATE_HZ
            chunk.pts, chunk.time_base = start, Fraction(1, SAMPLE_RATE_HZ)
            container.mux(audio.encode(chunk))
        container.mux(audio.encode(None))


def main() -> None:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("clips", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--switch-s", type=float, default=3.0)
    parser.add_argument("--seconds", type=float, default=18.0)
    parser.add_argument("--side", type=int, default=256)
    args = parser.parse_args()
    scene = build_scene(
        args.clips, args.out, switch_s=args.switch_s, seconds=args.seconds, side=args.side
    )
    print(json.dumps({"path": str(scene.path), "tiles": scene.tiles, "turns": scene.turns}))


if __name__ == "__main__":
    main()
