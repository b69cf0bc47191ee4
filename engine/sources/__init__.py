"""Media sources behind one async API: files, network URLs and capture devices."""

from engine.sources.base import (
    MediaSource,
    ReconnectPolicy,
    SourceState,
    SourceStateChange,
    SourceStats,
)
from engine.sources.kinds import DeviceSource, FileSource, UrlSource, open_source

__all__ = [
    "DeviceSource",
    "FileSource",
    "MediaSource",
    "ReconnectPolicy",
    "SourceState",
    "SourceStateChange",
    "SourceStats",
    "UrlSource",
    "open_source",
]
