"""What every benchmark records next to its numbers: the machine and the package versions."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
from collections.abc import Iterable
from pathlib import Path
from typing import Any

MACHINE = "2-core x86_64 VM shared with other jobs, no GPU"
"""Where the numbers in the benchmarks' docstrings were measured."""


def environment(packages: Iterable[str], **extra: Any) -> dict[str, Any]:
    """Machine, interpreter, load and package versions (None for a package not installed)."""
    versions: dict[str, str | None] = {}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "machine": MACHINE,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "versions": versions,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **extra,
    }


def write_report(report: dict[str, Any], out: Path) -> None:
    """Write the JSON report (creating its folder) and say where."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")
