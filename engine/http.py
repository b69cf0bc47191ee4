"""Plain HTTP requests with a body (WHIP's POST of an SDP offer) on the event server's port.

websockets serves the WebSocket handshake and bodiless GETs, and refuses any request with a
body. The event server therefore looks at each connection's first bytes: a request whose
method is not GET, or whose path belongs to a registered prefix, is read here (head and body,
both bounded), handed to an async handler, answered, and the connection closed. Everything
else goes to websockets untouched. One port serves the page, the events and the WHIP
endpoint, so a browser needs no cross-origin requests and a firewall one rule.

Limits: a head over :data:`MAX_HEAD_BYTES` gets 431, a body over the handler's
``max_body_bytes`` gets 413, chunked transfer coding 411 (WHIP clients send a
``Content-Length``).
"""

from __future__ import annotations

import http
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

MAX_HEAD_BYTES = 16384
DEFAULT_MAX_BODY_BYTES = 262144


@dataclass(frozen=True)
class HttpRequest:
    """One HTTP request read off the event server's port.

    Attributes:
        method: upper-case method.
        path: the path, without the query.
        query: parsed query parameters (last value wins).
        headers: header names in lower case (the last of repeated headers wins).
        body: the body bytes.
        peer: ``host:port`` of the client, for logs.
    """

    method: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]
    body: bytes = b""
    peer: str = ""

    def bearer(self) -> str | None:
        """The token of an ``Authorization: Bearer`` header, or of ``?token=``."""
        scheme, _, credentials = self.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            return credentials.strip()
        return self.query.get("token")


@dataclass(frozen=True)
class HttpReply:
    """What a handler answers."""

    status: http.HTTPStatus
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def text(cls, status: http.HTTPStatus, message: str) -> HttpReply:
        """A plain-text reply: ``message`` and a newline."""
        return cls(status, (message + "\n").encode("utf-8"))

    def encode(self, server: str, date: str) -> bytes:
        """The whole response, head and body; the connection closes after it."""
        lines = [
            f"HTTP/1.1 {self.status.value} {self.status.phrase}",
            f"Date: {date}",
            f"Server: {server}",
            "Connection: close",
            "Cache-Control: no-store",
            f"Content-Length: {len(self.body)}",
        ]
        if self.body:
            lines.append(f"Content-Type: {self.content_type}")
        lines += [f"{name}: {value}" for name, value in self.headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


HttpHandler = Callable[[HttpRequest], Awaitable[HttpReply]]


class HeadError(Exception):
    """A request that cannot be read; carries the status to answer."""

    def __init__(self, status: http.HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


def request_line(data: bytes) -> tuple[str, str] | None:
    """``(METHOD, path)`` of the first line of ``data``, or None until the line is complete."""
    end = data.find(b"\r\n")
    if end < 0:
        return None
    method, _, rest = data[:end].partition(b" ")
    target = rest.partition(b" ")[0]
    return method.decode("latin-1").upper(), urlsplit(target.decode("latin-1")).path


class RequestReader:
    """Accumulates the bytes of one request until head and body are complete.

    Args:
        peer: ``host:port`` of the client.
        max_body_bytes: largest body accepted.
    """

    def __init__(self, peer: str, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        """See the class docstring."""
        self.peer = peer
        self.max_body_bytes = max_body_bytes
        self._data = bytearray()
        self._head: tuple[str, str, dict[str, str], dict[str, str], int] | None = None

    def feed(self, data: bytes) -> HttpRequest | None:
        """Add bytes; the request once it is complete, else None.

        Raises:
            HeadError: the request is malformed or over a limit.
        """
        self._data += data
        if self._head is None:
            end = self._data.find(b"\r\n\r\n")
            if end < 0:
                if len(self._data) > MAX_HEAD_BYTES:
                    raise HeadError(
                        http.HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "head too large"
                    )
                return None
            self._head = self._parse_head(bytes(self._data[:end]))
            del self._data[: end + 4]
        method, path, query, headers, length = self._head
        if len(self._data) < length:
            return None
        return HttpRequest(method, path, query, headers, bytes(self._data[:length]), self.peer)

    def _parse_head(self, head: bytes) -> tuple[str, str, dict[str, str], dict[str, str], int]:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise HeadError(http.HTTPStatus.BAD_REQUEST, "malformed request line")
        target = urlsplit(parts[1])
        query = {name: values[-1] for name, values in parse_qs(target.query).items()}
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name.strip():
                raise HeadError(http.HTTPStatus.BAD_REQUEST, "malformed header line")
            headers[name.strip().lower()] = value.strip()
        if "transfer-encoding" in headers:
            raise HeadError(http.HTTPStatus.LENGTH_REQUIRED, "send a Content-Length")
        length = self._length(headers.get("content-length", "0"))
        return parts[0].upper(), target.path, query, headers, length

    def _length(self, text: str) -> int:
        if not text.isdigit():
            raise HeadError(http.HTTPStatus.BAD_REQUEST, "bad Content-Length")
        length = int(text)
        if length > self.max_body_bytes:
            raise HeadError(
                http.HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"body over {self.max_body_bytes} bytes",
            )
        return length
