"""The CLI as a user runs it: real processes, exit codes, one-line errors, JSON lines."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.conftest import clip, run_talkscope


def talkscope(*args: str) -> subprocess.CompletedProcess[str]:
    return run_talkscope(*args, timeout_s=120)


def test_main_job_runs_on_the_embedded_demo() -> None:
    result = talkscope("inspect")
    assert result.returncode == 0, result.stderr
    assert "75 frames at 25 fps" in result.stdout
    assert "mfcc    297 frames x 13" in result.stdout


def test_json_lines_and_one_bad_file_among_good_ones(tmp_path: Path) -> None:
    good = clip("grid_lipnet/swiz3n.mpg")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not media at all" * 100)
    result = talkscope("inspect", "--json", str(good), str(bad), str(tmp_path / "missing.mp4"))
    assert result.returncode == 2
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [("error" in line) for line in lines] == [False, True, True]
    assert lines[0]["video_frames"] == 75 and lines[0]["mfcc_frames"] == 297
    assert "bad.mp4" in lines[1]["error"] and "does not exist" in lines[2]["error"]
    assert "Traceback" not in result.stderr


def test_bad_input_exits_2_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    for args in (
        ["inspect", str(tmp_path / "missing.mp4")],
        ["inspect", "srt://127.0.0.1:9000"],
        ["inspect", "device:video=v4l2:/dev/video0"],
        ["inspect", "--preset", "nope"],
        ["no-such-command"],
    ):
        result = talkscope(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith("talkscope: error:")
        assert "Traceback" not in result.stderr


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = talkscope("--debug", "inspect", str(tmp_path / "missing.mp4"))
    assert result.returncode == 2
    assert "Traceback" in result.stderr


def test_version_and_help() -> None:
    assert talkscope("--version").stdout.startswith("talkscope ")
    result = talkscope()
    assert result.returncode == 2 and "inspect" in result.stdout
