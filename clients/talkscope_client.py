"""A typed asyncio client of the talkscope event server.

::

    async with TalkscopeClient("ws://127.0.0.1:8765", token="...") as client:
        print(client.hello["streams"])
        async for event in client.events(types=["speaker", "sync"]):
            if event["type"] == "sync":
                ...

Events are plain dicts (parsed JSON, see :mod:`engine.events` for the schema); the TypedDicts
:data:`SpeakerEvent`, :data:`SyncEvent` and the others describe them for type checkers. The
client does not reconnect: when the connection breaks it raises :class:`ConnectionLost`, and
the caller decides.

Errors, all :class:`ClientError` (an ``EngineError``)::

    ClientError                 the server or the connection failed the client
    ├── BadURL                  not a ws://, wss://, http:// or https:// URL (also ValueError)
    ├── TokenRefused            the server answered 401/403 (also PermissionError)
    ├── ServerUnreachable       no connection: refused, unknown host, timeout (retryable=True)
    └── ConnectionLost          closed abnormally after connecting (retryable=True)
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable
from types import TracebackType
from typing import Any, Self, cast
from urllib.parse import urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import (
    ConnectionClosed,
    ConnectionClosedOK,
    InvalidHandshake,
    InvalidStatus,
    InvalidURI,
)

from engine.core.errors import EngineError
from engine.events import (
    DroppedEvent,
    ErrorEvent,
    Event,
    HelloEvent,
    PongEvent,
    SpeakerEvent,
    StatsEvent,
    StreamEvent,
    SubscribedEvent,
    SyncEvent,
    TrackEndEvent,
    TrackStartEvent,
)

__all__ = [
    "BadURL",
    "ClientError",
    "ConnectionLost",
    "DroppedEvent",
    "ErrorEvent",
    "Event",
    "HelloEvent",
    "PongEvent",
    "ServerUnreachable",
    "SpeakerEvent",
    "StatsEvent",
    "StreamEvent",
    "SubscribedEvent",
    "SyncEvent",
    "TalkscopeClient",
    "TokenRefused",
    "TrackEndEvent",
    "TrackStartEvent",
    "events_url",
]


class ClientError(EngineError):
    """The event server or the connection to it failed the client."""


class BadURL(ClientError, ValueError):
    """The URL is not a WebSocket (or HTTP) URL of a host."""


class TokenRefused(ClientError, PermissionError):
    """The server refused the token (or its absence) with HTTP 401 or 403."""


class ServerUnreachable(ClientError):
    """No connection could be made: refused, unknown host, or the handshake timed out."""

    retryable = True


class ConnectionLost(ClientError):
    """The connection closed abnormally after it was open."""

    retryable = True


def events_url(url: str) -> str:
    """The WebSocket URL of the event stream for what a person typed.

    ``http`` becomes ``ws`` and ``https`` ``wss``; a URL with no path gets ``/events``.

    Raises:
        BadURL: another scheme, or no host.
    """
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as error:
        raise BadURL(f"{url}: {error}") from None
    scheme = {"ws": "ws", "wss": "wss", "http": "ws", "https": "wss"}.get(parts.scheme.lower())
    if scheme is None or not parts.hostname:
        raise BadURL(f"{url}: not a ws:// or wss:// URL of a host (e.g. ws://127.0.0.1:8765)")
    path = parts.path if parts.path not in {"", "/"} else "/events"
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


class TalkscopeClient:
    """One connection to a talkscope event server.

    An async context manager: entering connects and reads the server's ``hello``; leaving
    closes the connection (normal closure). Loop affinity: the loop that entered it.

    Args:
        url: ``ws://HOST:PORT`` or ``ws://HOST:PORT/events`` (``http://`` works too).
        token: sent as ``Authorization: Bearer`` when given.
        open_timeout_s: how long connecting and the handshake may take.
        max_message_bytes: largest server message accepted.
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        open_timeout_s: float = 10.0,
        max_message_bytes: int = 16 * 2**20,
    ) -> None:
        """See the class docstring."""
        self.url = events_url(url)
        self.open_timeout_s = open_timeout_s
        self.max_message_bytes = max_message_bytes
        self._token = token
        self._connection: ClientConnection | None = None
        self._hello: HelloEvent | None = None

    @property
    def hello(self) -> HelloEvent:
        """The server's ``hello``: its version, known streams and event types.

        Raises:
            ClientError: not connected yet.
        """
        if self._hello is None:
            raise ClientError("not connected: use `async with TalkscopeClient(...)`")
        return self._hello

    async def connect(self) -> None:
        """Connect and read ``hello`` (``async with`` calls this).

        Raises:
            BadURL: the URL is not a WebSocket URL.
            TokenRefused: the server answered 401 or 403.
            ServerUnreachable: the connection or the handshake failed or timed out.
            ClientError: the server is not a talkscope event server.
        """
        if self._connection is not None:
            raise ClientError("already connected")
        headers = {"Authorization": f"Bearer {self._token}"} if self._token is not None else None
        try:
            self._connection = await connect(
                self.url,
                additional_headers=headers,
                open_timeout=self.open_timeout_s,
                max_size=self.max_message_bytes,
                compression=None,
                close_timeout=5.0,
            )
        except InvalidURI as error:
            raise BadURL(f"{self.url}: {error}") from None
        except InvalidStatus as error:
            status = error.response.status_code
            if status in {401, 403}:
                raise TokenRefused(
                    f"{self.url}: the server refused the token (HTTP {status}); "
                    "pass the server's token"
                ) from None
            raise ClientError(
                f"{self.url}: HTTP {status} instead of a WebSocket: is this a talkscope server?"
            ) from None
        except InvalidHandshake as error:
            raise ClientError(f"{self.url}: WebSocket handshake failed: {error}") from None
        except TimeoutError:
            raise ServerUnreachable(f"{self.url}: timed out connecting") from None
        except OSError as error:
            reason = error.strerror or str(error) or type(error).__name__
            raise ServerUnreachable(f"{self.url}: cannot connect: {reason}") from None
        try:
            first = await self._receive()
        except BaseException:
            await self.aclose()
            raise
        if first is None or first.get("type") != "hello":
            await self.aclose()
            raise ClientError(f"{self.url}: the server did not say hello: not a talkscope server?")
        self._hello = cast(HelloEvent, first)

    async def _receive(self) -> dict[str, Any] | None:
        """The next message, parsed; None once the server closed normally (1000 or 1001).

        Raises:
            ConnectionLost: abnormal closure.
            ClientError: a message that is not a JSON object.
        """
        if self._connection is None:
            raise ClientError("not connected: use `async with TalkscopeClient(...)`")
        try:
            text = await self._connection.recv()
        except ConnectionClosedOK:
            return None
        except ConnectionClosed as error:
            raise ConnectionLost(f"{self.url}: connection lost: {error}") from None
        try:
            data = json.loads(text)
        except ValueError:
            raise ClientError(f"{self.url}: the server sent a message that is not JSON") from None
        if not isinstance(data, dict):
            raise ClientError(f"{self.url}: the server sent JSON that is not an object")
        return data

    async def _send(self, message: dict[str, Any]) -> None:
        if self._connection is None:
            raise ClientError("not connected: use `async with TalkscopeClient(...)`")
        try:
            await self._connection.send(json.dumps(message))
        except ConnectionClosed as error:
            raise ConnectionLost(f"{self.url}: connection lost: {error}") from None

    async def subscribe(
        self, streams: Iterable[str] | None = None, types: Iterable[str] | None = None
    ) -> SubscribedEvent:
        """Replace this connection's filter and wait for the server's ``subscribed``.

        Events that arrive before the acknowledgement (sent under the old filter) are
        discarded.

        Args:
            streams: stream ids to receive; None for all.
            types: event types to receive; None for all. Notices always come through.

        Returns:
            The acknowledgement, with the filter now in force.

        Raises:
            ClientError: the server refused the subscription (its error message says why).
            ConnectionLost: the connection broke or closed first.
        """
        await self._send(
            {
                "type": "subscribe",
                "streams": None if streams is None else list(streams),
                "events": None if types is None else list(types),
            }
        )
        while True:
            message = await self._receive()
            if message is None:
                raise ConnectionLost(f"{self.url}: the server closed before acknowledging")
            if message.get("type") == "subscribed":
                return cast(SubscribedEvent, message)
            if message.get("type") == "error":
                raise ClientError(f"subscription refused: {message.get('message')}")

    async def events(
        self, streams: Iterable[str] | None = None, types: Iterable[str] | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Every message from the server after ``hello``, until it closes the connection.

        With no filter nothing is sent, and every event of every stream comes through. With a
        filter, :meth:`subscribe` is called first. Notices (``dropped``, ``error``, ``pong``)
        are yielded too: a ``dropped`` says how many events this client lost for reading too
        slowly.

        Args:
            streams: stream ids to receive; None for all.
            types: event types to receive; None for all.

        Yields:
            Each event as a dict (narrow it on ``event["type"]``; see :data:`Event`).

        Raises:
            ClientError: the subscription was refused, or the server sent something that is
                not a JSON object.
            ConnectionLost: the connection closed abnormally. A normal closure (1000, or 1001
                when the server shuts down) just ends the iteration.
        """
        if streams is not None or types is not None:
            await self.subscribe(streams, types)
        while True:
            message = await self._receive()
            if message is None:
                return
            yield message

    async def aclose(self) -> None:
        """Close the connection (normal closure). Idempotent."""
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()
