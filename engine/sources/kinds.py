"""The kinds of source: local files, network URLs and capture devices, and :func:`open_source`.

Source URIs, as the CLI takes them:

- ``clip.mp4`` or ``file:///abs/clip.mp4``: a local file (paced at real time or as fast as
  possible; optionally looped).
- ``rtsp://``, ``rtsps://``, ``rtmp://``, ``rtmps://``, ``udp://``, ``tcp://``, ``rtp://``,
  ``http://``, ``https://`` (HLS playlists included): network streams through PyAV's FFmpeg,
  reconnected with backoff. ``srt://`` is refused with advice: the FFmpeg bundled with PyAV has
  no SRT protocol.
- ``device:default`` or ``device:video=FORMAT:NAME,audio=FORMAT:NAME``: capture devices, e.g.
  ``device:video=v4l2:/dev/video0,audio=alsa:default`` or, for a synthetic test device,
  ``device:video=lavfi:testsrc=size=640x480:rate=30,audio=lavfi:sine=f=440``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

import av

from engine.core.clock import Clock
from engine.core.errors import MediaNotFound, SourceUnavailable, UnsupportedSource, UsageError
from engine.sources.base import MediaSource, ReconnectPolicy, StateCallback
from engine.sources.demux import OpenSpec

NETWORK_SCHEMES = frozenset(
    {"rtsp", "rtsps", "rtmp", "rtmps", "udp", "tcp", "rtp", "http", "https"}
)
DEFAULT_DEVICES = {
    "linux": ("v4l2:/dev/video0", "alsa:default"),
    "darwin": ("avfoundation:0", "avfoundation::0"),
    "win32": ("dshow:video=Integrated Camera", "dshow:audio=Microphone"),
}
SRT_ADVICE = (
    "srt:// is not supported: the FFmpeg bundled with PyAV has no SRT protocol. Relay it to UDP "
    "with an SRT-capable tool (e.g. `ffmpeg -i srt://HOST:PORT -c copy -f mpegts "
    "udp://127.0.0.1:5000`) and open udp://127.0.0.1:5000 instead"
)


class FileSource(MediaSource):
    """A local media file.

    Args:
        path: the file.
        stream_id: defaults to the file name.
        paced: yield at real time by timestamps (as a live source would); else as fast as
            the consumer takes frames.
        loop: play again from the start at the end, timestamps still increasing.
        require_audio: fail unless the file has audio.
        require_video: fail unless the file has video.
        on_state: state-change callback (event loop).
        clock: pacing clock.

    Raises:
        MediaNotFound: the path is not an existing file.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        stream_id: str | None = None,
        *,
        paced: bool = False,
        loop: bool = False,
        require_audio: bool = False,
        require_video: bool = False,
        on_state: StateCallback | None = None,
        clock: Clock | None = None,
    ) -> None:
        """See the class docstring."""
        file = Path(path)
        if not file.is_file():
            reason = "is a directory" if file.is_dir() else "does not exist"
            raise MediaNotFound(f"{file}: {reason}")
        self.path = file
        super().__init__(
            stream_id or file.name,
            [OpenSpec(target=str(file), label=str(file))],
            live=False,
            paced=paced,
            loop=loop,
            require_audio=require_audio,
            require_video=require_video,
            on_state=on_state,
            clock=clock,
        )


class UrlSource(MediaSource):
    """A network stream (RTSP, RTMP, UDP, TCP, RTP, HTTP/HLS) read through PyAV.

    Args:
        url: the stream.
        stream_id: defaults to the URL without credentials.
        reconnect: backoff policy; the default retries forever.
        open_timeout_s: how long one connection attempt may take.
        read_timeout_s: how long a read may block before the connection counts as lost.
        require_audio: fail unless the stream has audio.
        require_video: fail unless the stream has video.
        on_state: state-change callback (event loop).

    Raises:
        UnsupportedSource: a scheme this build cannot read (``srt://`` among them).
    """

    def __init__(
        self,
        url: str,
        stream_id: str | None = None,
        *,
        reconnect: ReconnectPolicy | None = None,
        open_timeout_s: float = 5.0,
        read_timeout_s: float = 5.0,
        require_audio: bool = False,
        require_video: bool = False,
        on_state: StateCallback | None = None,
    ) -> None:
        """See the class docstring."""
        scheme = urlsplit(url).scheme.lower()
        if scheme == "srt":
            raise UnsupportedSource(SRT_ADVICE)
        if scheme not in NETWORK_SCHEMES:
            raise UnsupportedSource(
                f"{url!r}: unknown URL scheme {scheme!r}; use one of {sorted(NETWORK_SCHEMES)}"
            )
        label = redact(url)
        spec = OpenSpec(
            target=url,
            label=label,
            options=_network_options(scheme),
            open_timeout_s=open_timeout_s,
            read_timeout_s=read_timeout_s,
        )
        super().__init__(
            stream_id or label,
            [spec],
            live=True,
            reconnect=reconnect or ReconnectPolicy(),
            require_audio=require_audio,
            require_video=require_video,
            on_state=on_state,
        )


class DeviceSource(MediaSource):
    """Capture devices (camera and/or microphone) through FFmpeg's capture formats.

    Args:
        video: ``FORMAT:NAME`` of the camera (e.g. ``v4l2:/dev/video0``), or None.
        audio: ``FORMAT:NAME`` of the microphone (e.g. ``alsa:default``), or None.
        stream_id: defaults to ``device``.
        on_state: state-change callback (event loop).

    Raises:
        UsageError: neither device given, or a spec without ``FORMAT:``.
        UnsupportedSource: this FFmpeg build lacks the capture format.
        SourceUnavailable: the device does not exist.
    """

    def __init__(
        self,
        video: str | None,
        audio: str | None,
        stream_id: str | None = None,
        *,
        on_state: StateCallback | None = None,
    ) -> None:
        """See the class docstring."""
        if video is None and audio is None:
            raise UsageError("a device source needs a video or an audio device")
        specs = [
            _device_spec(text, want_video=kind == "video")
            for kind, text in (("video", video), ("audio", audio))
            if text is not None
        ]
        super().__init__(stream_id or "device", specs, live=True, on_state=on_state)


def _device_spec(text: str, *, want_video: bool) -> OpenSpec:
    fmt, sep, name = text.partition(":")
    if not sep or not fmt or not name:
        raise UsageError(f"device {text!r}: write it as FORMAT:NAME, e.g. v4l2:/dev/video0")
    if fmt not in av.formats_available:
        raise UnsupportedSource(
            f"device {text!r}: this FFmpeg build has no {fmt!r} capture input. PyAV's wheels "
            "bundle an FFmpeg without v4l2; install PyAV from source against a system FFmpeg "
            "(`pip install av --no-binary av`) to capture from cameras on Linux"
        )
    if name.startswith("/dev/") and not os.path.exists(name):
        raise SourceUnavailable(f"no capture device at {name}", retryable=False)
    options = {"use_wallclock_as_timestamps": "1"} if fmt != "lavfi" else {}
    return OpenSpec(
        target=name,
        label=f"device {text}",
        format=fmt,
        options=options,
        want_audio=not want_video,
        want_video=want_video,
    )


def _network_options(scheme: str) -> dict[str, str]:
    # Probe for one second, not FFmpeg's default five: a live stream should start fast.
    options = {"analyzeduration": "1000000", "probesize": "1000000"}
    if scheme in {"rtsp", "rtsps"}:
        options["rtsp_transport"] = "tcp"
    elif scheme == "udp":
        options.update(overrun_nonfatal="1", fifo_size="1000000")
    elif scheme in {"http", "https"}:
        options.update(reconnect="1", reconnect_streamed="1")
    return options


def redact(url: str) -> str:
    """The URL without user name and password (safe for logs and events)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


def parse_device(uri: str) -> tuple[str | None, str | None]:
    """``device:...`` to ``(video, audio)`` specs; ``device:default`` picks the platform's.

    Raises:
        UsageError: an unknown key, or a platform with no known default.
    """
    body = uri.removeprefix("device:")
    if body in {"", "default"}:
        platform = "linux" if sys.platform.startswith("linux") else sys.platform
        if platform not in DEFAULT_DEVICES:
            raise UsageError(f"no default capture devices known for {sys.platform}")
        return DEFAULT_DEVICES[platform]
    found: dict[str, str] = {}
    for part in body.split(","):
        key, sep, value = part.partition("=")
        if key not in {"video", "audio"} or not sep:
            raise UsageError(f"{uri!r}: write device:video=FORMAT:NAME,audio=FORMAT:NAME")
        found[key] = value
    return found.get("video"), found.get("audio")


def open_source(
    uri: str,
    stream_id: str | None = None,
    *,
    paced: bool = False,
    loop: bool = False,
    require_audio: bool = False,
    require_video: bool = False,
    on_state: StateCallback | None = None,
    reconnect: ReconnectPolicy | None = None,
    clock: Clock | None = None,
) -> MediaSource:
    """Build the right source for a path, URL or ``device:`` URI (see the module docstring).

    ``paced``, ``loop`` and ``clock`` apply to files; ``reconnect`` to URLs. Nothing is opened
    until the source is started (``async with``).

    Raises:
        MediaNotFound: a path that does not exist.
        UnsupportedSource: a URL scheme or capture format this build cannot read.
        UsageError: a malformed ``device:`` URI.
    """
    if uri.startswith("device:"):
        video, audio = parse_device(uri)
        return DeviceSource(video, audio, stream_id, on_state=on_state)
    scheme = urlsplit(uri).scheme.lower()
    if scheme == "file":
        uri = unquote(urlsplit(uri).path)
    elif len(scheme) > 1:  # one letter is a Windows drive
        return UrlSource(
            uri,
            stream_id,
            reconnect=reconnect,
            require_audio=require_audio,
            require_video=require_video,
            on_state=on_state,
        )
    return FileSource(
        uri,
        stream_id,
        paced=paced,
        loop=loop,
        require_audio=require_audio,
        require_video=require_video,
        on_state=on_state,
        clock=clock,
    )
