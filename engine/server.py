"""The event hub and the WebSocket event server.

:class:`EventHub` fans events out from the pipeline to subscribers; :class:`EventServer` serves
them over WebSocket. Both live on the pipeline's event loop (call them from that loop only)::

    pipeline --publish(event)--> EventHub --one bounded queue per client--> sender task
                                                                           --> WebSocket

``publish`` is synchronous and never waits: it serialises the event to JSON once, then appends
the text to the queue of every subscriber whose filter matches. A full queue drops its oldest
event (counted); before its next event that client receives one ``dropped`` notice with the
count. So a slow client loses events, while the pipeline and the other clients never wait for it
(the policy of websockets' ``docs/topics/broadcast.rst``).

Protocol (``ws://HOST:PORT/events``):

- With a token set, the handshake needs ``?token=T`` or ``Authorization: Bearer T``; otherwise
  HTTP 401. Tokens are compared in constant time. Prefer the header: URLs end up in logs.
- The server first sends ``hello``. A client that sends nothing receives every event of every
  stream.
- ``{"type": "subscribe", "streams": [...] | null, "events": [...] | null}`` replaces the
  client's filter (null = all) and is answered by ``subscribed``. Notices (``hello``,
  ``subscribed``, ``dropped``, ``error``, ``pong``) pass every filter, and so do ``stats`` events
  with a null ``stream_id``. ``{"type": "ping"}`` is answered by ``pong``.
- A refused message is answered by an ``error`` notice, and the connection stays open: bad JSON
  (``bad_json``); not an object, an unknown type or field, a binary message (``bad_request``);
  more than 256 streams or event types (``too_many``); a text message over
  ``max_message_bytes`` (``too_large``); more than ``max_messages_per_s`` messages a second
  (``rate_limited``: the message is ignored).
- A message over ``max_frame_bytes`` (16 MiB by default) is not read at all: websockets closes
  the connection with code 1009 (message too big). Between the two limits the message is read
  and refused, so a client that sends 10 MB gets an answer rather than a dropped connection.
- Keepalive: WebSocket pings every ``ping_interval_s``; a client that does not answer within
  ``ping_timeout_s`` is disconnected. A broken connection removes that client only.

Plain HTTP on the same port: ``GET /schema.json`` (the event schema) and ``GET /`` (a short page)
are public; ``GET /health`` (``{"ok", "streams", "clients"}``) needs the token when one is set.
Anything else is a 404.
"""

from __future__ import annotations

import asyncio
import email.utils
import hmac
import http
import json
import logging
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from engine import __version__
from engine.core.channel import Channel, FullPolicy
from engine.core.errors import ChannelClosed, UsageError
from engine.events import EVENT_TYPES, NOTICE_TYPES, json_schema, make_event
from engine.http import HeadError, HttpHandler, HttpReply, HttpRequest, RequestReader, request_line

logger = logging.getLogger(__name__)

DEFAULT_MAX_QUEUE = 256
"""Events queued per client before the oldest are dropped."""
MAX_REQUEST_LINE = 8192
"""Longest HTTP request line looked at before deciding who reads a connection."""
MAX_FILTER_ENTRIES = 256
"""Most entries in the ``streams`` or ``events`` list of one subscription."""
EVENTS_PATH = "/events"
SERVER_NAME = f"talkscope {__version__}"
SERVER_HEADER = SERVER_NAME.replace(" ", "/")
"""``Server:`` header of every HTTP answer (a product token has no spaces)."""

_NOTICES = frozenset(NOTICE_TYPES)
_KNOWN_TYPES = frozenset(EVENT_TYPES)
_SUBSCRIBE_KEYS = frozenset({"type", "streams", "events"})


def _dumps(event: Mapping[str, Any]) -> str:
    # allow_nan=False: NaN is not JSON, and browsers' JSON.parse refuses it.
    return json.dumps(event, separators=(",", ":"), allow_nan=False)


# -- the hub ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Queued:
    """One serialised event, shared by every queue it went to."""

    event_type: str
    stream_id: str | None
    text: str


@dataclass(frozen=True, slots=True)
class _Gap:
    """Stands at the head of a queue for the ``count`` events dropped there."""

    count: int


_Item = _Queued | _Gap


def _merge_gap(marker: _Item | None, victim: _Item) -> _Item:
    """The channel's MARK_GAP callback: one marker for all the drops since the last read."""
    before = marker.count if isinstance(marker, _Gap) else 0
    lost = victim.count if isinstance(victim, _Gap) else 1
    return _Gap(before + lost)


class Subscription:
    """One subscriber of an :class:`EventHub`: a filter and a bounded queue of JSON texts.

    Made by :meth:`EventHub.subscribe`. One consumer reads it with :meth:`recv` (or ``async
    for``). Loop affinity: the hub's loop.

    Attributes:
        name: shown in logs and in :meth:`EventHub.client_drops`.
        delivered: events handed out by :meth:`recv` (notices not counted).
    """

    def __init__(
        self,
        name: str,
        max_queue: int,
        streams: Iterable[str] | None,
        types: Iterable[str] | None,
    ) -> None:
        """Use :meth:`EventHub.subscribe`."""
        self.name = name
        self.delivered = 0
        self._channel: Channel[_Item] = Channel(
            max_queue, FullPolicy.MARK_GAP, on_gap=_merge_gap, name=f"events to {name}"
        )
        self._streams: frozenset[str] | None = None
        self._types: frozenset[str] | None = None
        self.set_filter(streams, types)

    @property
    def streams(self) -> frozenset[str] | None:
        """Stream ids this subscriber receives; None for all."""
        return self._streams

    @property
    def types(self) -> frozenset[str] | None:
        """Event types this subscriber receives (notices always pass); None for all."""
        return self._types

    @property
    def dropped(self) -> int:
        """Events dropped from this subscriber's queue because it was full."""
        return self._channel.stats.dropped

    @property
    def queued(self) -> int:
        """Items waiting in the queue now."""
        return len(self._channel)

    @property
    def closed(self) -> bool:
        """True once the hub let go of this subscription."""
        return self._channel.closed

    def set_filter(self, streams: Iterable[str] | None, types: Iterable[str] | None) -> None:
        """Replace the filter; queued events the new filter refuses are skipped, not sent.

        Args:
            streams: stream ids to receive, None for all. Events with a null ``stream_id``
                (server-wide stats) always pass.
            types: event types to receive, None for all. Notices always pass.
        """
        self._streams = None if streams is None else frozenset(streams)
        self._types = None if types is None else frozenset(types)

    def wants(self, event_type: str, stream_id: str | None) -> bool:
        """Whether the filter lets an event of this type and stream through."""
        if event_type in _NOTICES:
            return True
        if self._types is not None and event_type not in self._types:
            return False
        return stream_id is None or self._streams is None or stream_id in self._streams

    def offer(self, item: _Item) -> None:
        """Queue one item without waiting (the hub calls this); a full queue drops its oldest."""
        if not self._channel.closed:
            self._channel.send_nowait(item)

    async def recv(self) -> str:
        """The JSON text of the next event, or of a ``dropped`` notice when events were lost.

        Raises:
            ChannelClosed: the subscription was closed and everything queued was read.
            ConcurrencyError: another task is already waiting in ``recv``.
        """
        while True:
            item = await self._channel.recv()
            if isinstance(item, _Gap):
                return _dumps(make_event("dropped", None, None, count=item.count))
            if self.wants(item.event_type, item.stream_id):  # the filter may have changed
                self.delivered += 1
                return item.text

    def close(self) -> None:
        """Stop queueing; :meth:`recv` returns what is queued, then raises. Idempotent."""
        self._channel.close()

    def __aiter__(self) -> AsyncIterator[str]:
        """Iterate over JSON texts until the subscription is closed and drained."""
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[str]:
        while True:
            try:
                yield await self.recv()
            except ChannelClosed:
                return


class EventHub:
    """Fan-out of events from the pipeline to any number of subscribers.

    Loop affinity: one event loop; :meth:`publish` is called from it, never from a thread.

    Args:
        max_queue: events queued per subscriber before the oldest are dropped; at least 1.

    Attributes:
        published: events passed to :meth:`publish` so far.
    """

    def __init__(self, *, max_queue: int = DEFAULT_MAX_QUEUE) -> None:
        """See the class docstring."""
        if max_queue < 1:
            raise UsageError(f"max_queue must be at least 1, got {max_queue}")
        self.max_queue = max_queue
        self.published = 0
        self._streams: set[str] = set()
        self._subscriptions: list[Subscription] = []
        self._serial = 0
        self._last_state: dict[str, _Queued] = {}  # stream id -> its latest ``stream`` event

    @property
    def streams(self) -> frozenset[str]:
        """The stream ids known now (what ``hello`` lists)."""
        return frozenset(self._streams)

    def add_stream(self, stream_id: str) -> None:
        """Make a stream known to clients (listed in ``hello`` and ``/health``). Idempotent."""
        self._streams.add(stream_id)

    def remove_stream(self, stream_id: str) -> None:
        """Forget a stream (after its ``ended`` event, say). Idempotent."""
        self._streams.discard(stream_id)

    @property
    def subscriptions(self) -> tuple[Subscription, ...]:
        """The current subscribers."""
        return tuple(self._subscriptions)

    def subscribe(
        self,
        *,
        streams: Iterable[str] | None = None,
        types: Iterable[str] | None = None,
        name: str | None = None,
        max_queue: int | None = None,
    ) -> Subscription:
        """Add a subscriber; it receives events published from now on.

        It first receives the latest ``stream`` event of each stream (its current state), so a
        client that connects late still learns that a stream has started, stalled or failed.

        Args:
            streams: stream ids to receive; None for all.
            types: event types to receive; None for all.
            name: for logs and stats; ``client-N`` when None.
            max_queue: its queue size; the hub's ``max_queue`` when None.

        Returns:
            The subscription; pass it to :meth:`unsubscribe` when done.
        """
        self._serial += 1
        subscription = Subscription(
            name or f"client-{self._serial}",
            self.max_queue if max_queue is None else max_queue,
            streams,
            types,
        )
        self._subscriptions.append(subscription)
        for item in self._last_state.values():  # a late joiner learns each stream's state
            if subscription.wants(item.event_type, item.stream_id):
                subscription.offer(item)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        """Remove a subscriber and close its queue. Idempotent."""
        subscription.close()
        if subscription in self._subscriptions:
            self._subscriptions.remove(subscription)

    def publish(self, event: Mapping[str, Any]) -> None:
        """Queue one event for every subscriber whose filter matches. Never waits.

        The event is serialised to JSON once (only when someone wants it); a subscriber whose
        queue is full loses its oldest queued event instead.

        Args:
            event: an event from :func:`engine.events.make_event`.

        Raises:
            ValueError: the event has no ``type``/``stream_id``, or is not JSON (NaN, say).
        """
        try:
            event_type, stream_id = event["type"], event["stream_id"]
        except KeyError as error:
            raise ValueError(
                f"not an event (no {error.args[0]!r}): make it with make_event"
            ) from None
        self.published += 1
        item: _Queued | None = None
        if event_type == "stream" and stream_id is not None:
            item = self._queued(event)
            self._last_state[stream_id] = item
        for subscription in self._subscriptions:
            if not subscription.wants(event_type, stream_id):
                continue
            if item is None:
                item = self._queued(event)
            subscription.offer(item)

    @staticmethod
    def _queued(event: Mapping[str, Any]) -> _Queued:
        try:
            return _Queued(event["type"], event["stream_id"], _dumps(event))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{event['type']} event is not JSON: {error}") from None

    def client_drops(self) -> dict[str, int]:
        """Events dropped so far per current subscriber name (for ``stats`` events)."""
        return {s.name: s.dropped for s in self._subscriptions}


# -- the server ------------------------------------------------------------------------------


class _RateLimit:
    """A token bucket: ``rate_per_s`` messages a second, bursts of up to ``burst``."""

    def __init__(self, rate_per_s: float, burst: float) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._tokens = burst
        self._last_s = time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._last_s) * self.rate_per_s)
        self._last_s = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


def _http_response(status: http.HTTPStatus, body: bytes, content_type: str) -> Response:
    headers = Headers(
        [
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Connection", "close"),
            ("Content-Length", str(len(body))),
            ("Content-Type", content_type),
            ("Cache-Control", "no-store"),
        ]
    )
    return Response(status.value, status.phrase, headers, body)


def _error(code: str, message: str) -> str:
    return _dumps(make_event("error", None, None, message=message, code=code))


def _excerpt(value: Any) -> str:
    """A short repr of client data for an error message (never echo 10 MB back)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_WEB_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}


def _page_file(path: str) -> tuple[bytes, str] | None:
    """The page's static files, shipped in ``engine/assets/web`` (no build step)."""
    entry = _WEB_FILES.get(path)
    if entry is None:
        return None
    name, content_type = entry
    return resources.files("engine.assets").joinpath("web", name).read_bytes(), content_type


class EventServer:
    """Serves an :class:`EventHub` over WebSocket (see the module docstring for the protocol).

    An async context manager: ``async with EventServer(hub) as server: ...`` listens on entry
    and calls :meth:`aclose` on exit. Loop affinity: the hub's loop.

    Args:
        hub: the events to serve.
        host: address to listen on; keep the default (loopback) unless clients are remote,
            and then set a token. With ``port=0`` give one address, not a name that resolves to
            several (each would get its own port).
        port: TCP port; 0 picks a free one (read it from :attr:`port`).
        token: when set, ``/events`` and ``/health`` need it.
        max_message_bytes: largest client text message answered normally; larger ones get a
            ``too_large`` error.
        max_frame_bytes: largest message read at all; websockets closes the connection with
            code 1009 beyond it.
        max_queue: events queued per client; the hub's ``max_queue`` when None.
        max_messages_per_s: client messages allowed per second (bursts of as many); None for
            no limit.
        ping_interval_s: keepalive ping interval; None disables keepalive.
        ping_timeout_s: a client that does not answer a ping within this is disconnected.
        close_timeout_s: how long one closing handshake may take.
        open_timeout_s: how long one opening handshake may take.
        http_handlers: path prefix -> handler for plain HTTP requests with a body (the WHIP
            endpoint); the token, when set, is checked before the handler runs (but for
            ``OPTIONS``, the browsers' preflight). See :mod:`engine.http`.
    """

    def __init__(
        self,
        hub: EventHub,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        token: str | None = None,
        max_message_bytes: int = 65536,
        max_frame_bytes: int = 16 * 2**20,
        max_queue: int | None = None,
        max_messages_per_s: float | None = 100.0,
        ping_interval_s: float | None = 20.0,
        ping_timeout_s: float | None = 20.0,
        close_timeout_s: float = 2.0,
        open_timeout_s: float = 10.0,
        http_handlers: Mapping[str, HttpHandler] | None = None,
    ) -> None:
        """See the class docstring."""
        if token is not None and not token:
            raise UsageError("token must not be empty (pass None for no token)")
        if max_message_bytes > max_frame_bytes:
            raise UsageError("max_message_bytes must not exceed max_frame_bytes")
        self.hub = hub
        self.host = host
        self._port = port
        self._token = None if token is None else token.encode("utf-8")
        self.max_message_bytes = max_message_bytes
        self.max_frame_bytes = max_frame_bytes
        self.max_queue = max_queue
        self.max_messages_per_s = max_messages_per_s
        self.ping_interval_s = ping_interval_s
        self.ping_timeout_s = ping_timeout_s
        self.close_timeout_s = close_timeout_s
        self.open_timeout_s = open_timeout_s
        self._server: Server | None = None
        self._closed: asyncio.Event | None = None
        self._connections: set[ServerConnection] = set()  # WebSocket clients being served
        self._live: set[ServerConnection] = set()  # every TCP connection, handshakes included
        self._schema_body = json.dumps(json_schema(), indent=2).encode("utf-8")
        self._http_handlers = dict(http_handlers or {})
        self._http_tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        """The TCP port listened on (the one picked when 0 was given, once started)."""
        return self._port

    @property
    def url(self) -> str:
        """``ws://HOST:PORT/events``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self._port}{EVENTS_PATH}"

    @property
    def clients(self) -> int:
        """WebSocket clients connected now."""
        return len(self._connections)

    async def start(self) -> None:
        """Listen (``async with`` calls this).

        Raises:
            UsageError: already started, or the address cannot be listened on (port taken,
                address not on this machine, no permission).
        """
        if self._server is not None or self._closed is not None:
            raise UsageError("EventServer.start: already started")
        try:
            self._server = await self._serve()
        except OSError as error:
            reason = error.strerror or str(error)
            raise UsageError(f"cannot listen on {self.host}:{self._port}: {reason}") from error
        self._port = self._server.sockets[0].getsockname()[1]
        logger.info("event server listening on %s", self.url)

    def _serve(self) -> Server:
        live = self._live
        owner = self

        class TrackedConnection(ServerConnection):
            """A connection this server knows from its first byte, handshake included.

            websockets lists connections only once their handshake is done; aclose must be
            able to abort any of them. The first bytes decide who reads the connection:
            websockets, or :meth:`EventServer._http_data` for a request with a body.
            """

            front = b""
            mode = ""  # "" until the request line is in, then "ws" or "http"
            reader: RequestReader | None = None

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                super().connection_made(transport)
                live.add(self)

            def data_received(self, data: bytes) -> None:
                if self.mode == "ws":
                    super().data_received(data)
                elif self.mode == "http":
                    owner._http_data(self, data)
                else:
                    self._route_first(data)

            def _route_first(self, data: bytes) -> None:
                self.front += data
                line = request_line(self.front)
                if line is None and len(self.front) <= MAX_REQUEST_LINE:
                    return
                data, self.front = self.front, b""
                if line is not None and not owner._is_http(*line):
                    self.mode = "ws"
                    super().data_received(data)
                    return
                self.mode = "http"
                self.reader = RequestReader(_peer(self))
                owner._http_data(self, data)

            def connection_lost(self, exc: Exception | None) -> None:
                live.discard(self)
                super().connection_lost(exc)

        return serve(
            self._handle,
            self.host,
            self._port,
            process_request=self._route,
            # Each event would be deflated once per client, undoing serialise-once; events are
            # small JSON, and a LAN has the bandwidth.
            compression=None,
            max_size=self.max_frame_bytes,
            ping_interval=self.ping_interval_s,
            ping_timeout=self.ping_timeout_s,
            close_timeout=self.close_timeout_s,
            open_timeout=self.open_timeout_s,
            server_header=SERVER_HEADER,
            create_connection=TrackedConnection,
        )

    async def aclose(self) -> None:
        """Stop accepting, close every client with 1001 (going away), wait for the handlers.

        Idempotent, and bounded by ``close_timeout_s`` plus 2 s: connections still open after
        ``close_timeout_s`` plus a second (a client that stopped reading, one that never
        finished its handshake) are aborted.
        """
        if self._closed is not None:
            await self._closed.wait()
            return
        self._closed = asyncio.Event()
        server, self._server = self._server, None
        try:
            if server is not None:
                await self._shut(server)
        finally:
            self._closed.set()

    async def _shut(self, server: Server) -> None:
        http_tasks = list(self._http_tasks)
        for task in http_tasks:
            task.cancel()
        await asyncio.gather(*http_tasks, return_exceptions=True)
        server.close(close_connections=True, code=CloseCode.GOING_AWAY, reason="server closing")
        try:
            async with asyncio.timeout(self.close_timeout_s + 1.0):
                await server.wait_closed()
            return
        except TimeoutError:
            # Stuck: a client that stopped reading leaves the close frame behind a full socket
            # buffer; one that connected and sent nothing holds its handshake open.
            stuck = list(self._live)
            logger.warning("event server: aborting %d connection(s) stuck closing", len(stuck))
        for connection in stuck:
            connection.transport.abort()
        try:
            async with asyncio.timeout(1.0):
                await server.wait_closed()
        except TimeoutError:
            logger.error("event server: handlers still running after abort")

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- HTTP ----------------------------------------------------------------------------

    def _authorized(self, request: Request, query: str) -> bool:
        if self._token is None:
            return True
        given: str | None = None
        for value in request.headers.get_all("Authorization"):
            scheme, _, credentials = value.partition(" ")
            if scheme.lower() == "bearer":
                given = credentials.strip()
        if given is None:
            values = parse_qs(query).get("token")
            given = values[-1] if values else None
        return self._token_ok(given)

    def _route(self, connection: ServerConnection, request: Request) -> Response | None:
        """``process_request``: HTTP routes, and the token check of the WebSocket handshake."""
        parts = urlsplit(request.path)
        path = parts.path
        if path in {EVENTS_PATH, "/health"} and not self._authorized(request, parts.query):
            logger.info("event server: refused %s %s (token)", _peer(connection), path)
            response = connection.respond(http.HTTPStatus.UNAUTHORIZED, "missing or wrong token\n")
            response.headers["WWW-Authenticate"] = 'Bearer realm="talkscope"'
            return response
        if path == EVENTS_PATH:
            return None  # go on with the WebSocket handshake
        if path == "/health":
            body = json.dumps(
                {"ok": True, "streams": sorted(self.hub.streams), "clients": self.clients}
            )
            return _http_response(http.HTTPStatus.OK, body.encode(), "application/json")
        if path == "/schema.json":
            return _http_response(http.HTTPStatus.OK, self._schema_body, "application/json")
        page = _page_file(path)
        if page is not None:
            return _http_response(http.HTTPStatus.OK, *page)
        return connection.respond(http.HTTPStatus.NOT_FOUND, "not found\n")

    # -- HTTP requests with a body (engine.http) --------------------------------------------

    def _is_http(self, method: str, path: str) -> bool:
        if method != "GET":
            return True
        return any(path.startswith(prefix) for prefix in self._http_handlers)

    def _http_data(self, connection: Any, data: bytes) -> None:
        """Feed one connection's bytes to its request reader; answer when complete."""
        reader: RequestReader | None = connection.reader
        if reader is None:
            return  # answered already: ignore what else arrives
        try:
            request = reader.feed(data)
        except HeadError as error:
            connection.reader = None
            self._write_reply(connection, HttpReply.text(error.status, str(error)))
            return
        if request is None:
            return
        connection.reader = None
        task = asyncio.create_task(self._answer_http(connection, request), name="http-request")
        self._http_tasks.add(task)
        task.add_done_callback(self._http_tasks.discard)

    async def _answer_http(self, connection: ServerConnection, request: HttpRequest) -> None:
        try:
            reply = await self._dispatch(request)
        except Exception:  # a bug of ours: answer 500, keep serving everyone else
            logger.exception("event server: %s %s failed", request.method, request.path)
            reply = HttpReply.text(http.HTTPStatus.INTERNAL_SERVER_ERROR, "internal error")
        logger.info(
            "event server: %s %s %s -> %d",
            request.peer,
            request.method,
            request.path,
            reply.status.value,
        )
        self._write_reply(connection, reply)

    async def _dispatch(self, request: HttpRequest) -> HttpReply:
        for prefix, handler in self._http_handlers.items():
            if request.path.startswith(prefix):
                if request.method != "OPTIONS" and not self._token_ok(request.bearer()):
                    return HttpReply(
                        http.HTTPStatus.UNAUTHORIZED,
                        b"missing or wrong token\n",
                        headers={"WWW-Authenticate": 'Bearer realm="talkscope"'},
                    )
                return await handler(request)
        return HttpReply(
            http.HTTPStatus.METHOD_NOT_ALLOWED, b"method not allowed\n", headers={"Allow": "GET"}
        )

    def _token_ok(self, given: str | None) -> bool:
        if self._token is None:
            return True
        return given is not None and hmac.compare_digest(given.encode("utf-8"), self._token)

    @staticmethod
    def _write_reply(connection: ServerConnection, reply: HttpReply) -> None:
        date = email.utils.formatdate(usegmt=True)
        transport = connection.transport
        if transport.is_closing():
            return
        transport.write(reply.encode(SERVER_HEADER, date))
        transport.close()

    # -- WebSocket -----------------------------------------------------------------------

    async def _handle(self, connection: ServerConnection) -> None:
        """One client: hello, then a sender task and this reader until the connection ends."""
        name = _peer(connection)
        subscription = self.hub.subscribe(name=name, max_queue=self.max_queue)
        self._connections.add(connection)
        logger.info("event server: client %s connected", name)
        try:
            hello = make_event(
                "hello",
                None,
                None,
                streams=sorted(self.hub.streams),
                event_types=list(EVENT_TYPES),
                server=SERVER_NAME,
            )
            await connection.send(_dumps(hello))
            async with asyncio.TaskGroup() as group:
                sender = group.create_task(
                    self._send_events(connection, subscription), name=f"event-sender {name}"
                )
                try:
                    await self._read_messages(connection, subscription)
                finally:
                    sender.cancel()
        except ConnectionClosed:
            pass
        finally:
            self.hub.unsubscribe(subscription)
            self._connections.discard(connection)
            logger.info(
                "event server: client %s gone (%s), %d event(s) dropped",
                name,
                connection.close_code,
                subscription.dropped,
            )

    @staticmethod
    async def _send_events(connection: ServerConnection, subscription: Subscription) -> None:
        """Move the client's queue to its socket; a slow socket only fills this one queue."""
        try:
            async for text in subscription:
                await connection.send(text)
        except ConnectionClosed:
            return

    async def _read_messages(
        self, connection: ServerConnection, subscription: Subscription
    ) -> None:
        """Answer the client's messages until the connection closes.

        Answers are sent from here, so a client that floods messages without reading the
        answers is slowed down by its own socket (the send waits), not the server.
        """
        limit = (
            None
            if self.max_messages_per_s is None
            else _RateLimit(self.max_messages_per_s, max(1.0, self.max_messages_per_s))
        )
        while True:
            try:
                message = await connection.recv()
            except ConnectionClosed:
                return
            if limit is not None and not limit.allow():
                reply = _error("rate_limited", "too many messages: this one was ignored")
            else:
                reply = self._answer(message, subscription)
            try:
                await connection.send(reply)
            except ConnectionClosed:
                return

    def _answer(self, message: str | bytes, subscription: Subscription) -> str:
        """The reply to one client message (an ack, a pong or an error), as JSON text."""
        if not isinstance(message, str):
            return _error("bad_request", "binary messages are not accepted: send JSON text")
        limit = self.max_message_bytes
        if len(message) > limit or len(message.encode("utf-8")) > limit:
            return _error("too_large", f"message larger than {limit} bytes")
        try:
            data = json.loads(message)
        except (ValueError, RecursionError):
            return _error("bad_json", "message is not valid JSON")
        if not isinstance(data, dict):
            return _error("bad_request", "message must be a JSON object with a type")
        kind = data.get("type")
        if kind == "ping" and data.keys() == {"type"}:
            return _dumps(make_event("pong", None, None))
        if kind == "subscribe":
            return self._subscribe(data, subscription)
        return _error("bad_request", f"unknown message {_excerpt(kind)}: use subscribe or ping")

    @staticmethod
    def _subscribe(data: dict[str, Any], subscription: Subscription) -> str:
        extra = data.keys() - _SUBSCRIBE_KEYS
        if extra:
            return _error("bad_request", f"subscribe: unknown field(s) {_excerpt(sorted(extra))}")
        lists: dict[str, list[str] | None] = {}
        for key in ("streams", "events"):
            value = data.get(key)
            if value is None:
                lists[key] = None
                continue
            if not isinstance(value, list):
                return _error("bad_request", f"subscribe: {key} must be a list or null")
            if len(value) > MAX_FILTER_ENTRIES:
                return _error(
                    "too_many", f"subscribe: more than {MAX_FILTER_ENTRIES} entries in {key}"
                )
            if not all(isinstance(item, str) for item in value):
                return _error("bad_request", f"subscribe: {key} must list strings")
            lists[key] = sorted(set(value))
        unknown = [t for t in lists["events"] or () if t not in _KNOWN_TYPES]
        if unknown:
            return _error("bad_request", f"subscribe: unknown event type(s) {_excerpt(unknown)}")
        subscription.set_filter(lists["streams"], lists["events"])
        ack = make_event("subscribed", None, None, streams=lists["streams"], events=lists["events"])
        return _dumps(ack)


def _peer(connection: ServerConnection) -> str:
    """``host:port`` of the other end, for logs and per-client stats."""
    address = connection.remote_address
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)
