"""The event schema, the hub, the WebSocket server, the Python client and ``watch``.

Real sockets on 127.0.0.1 port 0 and real processes; nothing of ours is mocked.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK, InvalidStatus

from clients.talkscope_client import (
    BadURL,
    ClientError,
    ServerUnreachable,
    TalkscopeClient,
    TokenRefused,
    events_url,
)
from clients.watch import describe
from engine.core.errors import UsageError
from engine.events import (
    EVENT_TYPES,
    SCHEMA_VERSION,
    TYPED_EVENTS,
    json_schema,
    make_event,
    schema_text,
)
from engine.server import EventHub, EventServer
from tests.conftest import REPO, scaled

# -- events and their schema ----------------------------------------------------------------

BOX = [10.0, 20.0, 110.0, 140.0]
STATS = {
    "stages": {"faces": {"p50_ms": 3.1, "p95_ms": 5.0, "p99_ms": None}},
    "queues": {"video": 2, "audio": 0},
    "drops": {"video": 1},
    "latency_ms": {"p50": 80.0, "p95": 120.0, "p99": None},
}

# (type, stream_id, pts_ns, fields): every type, and the null variants of the nullable fields.
SAMPLES: list[tuple[str, str | None, int | None, dict[str, Any]]] = [
    ("stream", "cam1", 0, {"state": "started", "source": "rtsp://cam/live", "message": None}),
    ("stream", "cam1", None, {"state": "error", "source": "rtsp://cam/live", "message": "down"}),
    ("track_start", "cam1", 40_000_000, {"track_id": 2, "box": BOX}),
    ("track_end", "cam1", 4_000_000_000, {"track_id": 2, "box": BOX, "frames": 100}),
    (
        "speaker",
        "cam1",
        12_480_000_000,
        {"track_id": 2, "box": BOX, "score": 0.91, "state": "speaking", "since_pts_ns": 10**10},
    ),
    (
        "speaker",
        "cam1",
        12_520_000_000,
        {"track_id": None, "box": None, "score": 0.1, "state": "silent", "since_pts_ns": None},
    ),
    (
        "sync",
        "cam1",
        12_600_000_000,
        {
            "track_id": 2,
            "state": "ok",
            "offset_frames": -3,
            "offset_ms": -120.0,
            "confidence": 4.1,
            "min_dist": 6.2,
            "window_s": 2.0,
            "frames": 40,
            "reason": None,
            "box": [10.0, 20.0, 110.0, 140.0],
        },
    ),
    (
        "sync",
        "cam1",
        12_600_000_000,
        {
            "track_id": 3,
            "state": "unknown",
            "offset_frames": None,
            "offset_ms": None,
            "confidence": None,
            "min_dist": None,
            "window_s": 2.0,
            "frames": 3,
            "reason": "too few windows",
            "box": [0.0, 0.0, 50.0, 60.0],
        },
    ),
    (
        "identity",
        "cam1",
        12_600_000_000,
        {
            "track_id": 3,
            "identity_id": 2,
            "name": "Katie Hill",
            "face_score": 0.91,
            "voice_match": 0.12,
            "evidence_s": 6.4,
        },
    ),
    ("stats", "cam1", 12_600_000_000, STATS),
    ("stats", None, None, STATS),
    ("hello", None, None, {"streams": ["cam1"], "event_types": list(EVENT_TYPES), "server": "x"}),
    ("subscribed", None, None, {"streams": None, "events": ["speaker"]}),
    ("dropped", None, None, {"count": 7}),
    ("error", None, None, {"message": "message is not valid JSON", "code": "bad_json"}),
    ("pong", None, None, {}),
]


def sample(event_type: str, index: int = 0) -> dict[str, Any]:
    """The ``index``-th sample of a type, made now."""
    matches = [s for s in SAMPLES if s[0] == event_type]
    kind, stream_id, pts_ns, fields = matches[index]
    return make_event(kind, stream_id, pts_ns, **fields)


def test_samples_cover_every_event_type() -> None:
    assert {s[0] for s in SAMPLES} == set(EVENT_TYPES)


@pytest.mark.parametrize("case", SAMPLES, ids=lambda c: f"{c[0]}-{c[3].get('state', '')}")
def test_every_event_validates_against_the_schema(
    case: tuple[str, str | None, int | None, dict[str, Any]],
) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    event_type, stream_id, pts_ns, fields = case
    event = make_event(event_type, stream_id, pts_ns, **fields)
    assert json.loads(json.dumps(event, allow_nan=False)) == event
    jsonschema.Draft202012Validator(schema).validate(event)
    assert event["schema_version"] == SCHEMA_VERSION
    assert abs(event["wall_time_ns"] - time.time_ns()) < 60 * 10**9


def test_the_schema_refuses_what_make_event_refuses() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(json_schema())
    good = sample("speaker")
    bad = [
        {**good, "extra": 1},
        {**good, "state": "shouting"},
        {**good, "box": [1, 2, 3]},
        {**good, "score": 1.5},
        {k: v for k, v in good.items() if k != "since_pts_ns"},
        {**good, "stream_id": None},
        {**sample("dropped"), "stream_id": "cam1"},
        {**sample("stats"), "latency_ms": {"p50": 1.0}},
        {**good, "type": "speakers"},
    ]
    for event in bad:
        assert not validator.is_valid(event), event
    subscribe = {"type": "subscribe", "streams": ["cam1"], "events": None}
    client_message = {"$ref": "#/$defs/client_message", "$defs": json_schema()["$defs"]}
    assert jsonschema.Draft202012Validator(client_message).is_valid(subscribe)
    assert not jsonschema.Draft202012Validator(client_message).is_valid({"type": "dance"})


def test_committed_schema_file_is_current() -> None:
    committed = (REPO / "docs" / "events.schema.json").read_text(encoding="utf-8")
    assert json.loads(committed) == json_schema(), (
        'docs/events.schema.json is stale: python -c "from engine.events import write_schema; '
        "write_schema('docs/events.schema.json')\""
    )
    assert committed == schema_text()


def test_typed_dicts_match_the_field_table() -> None:
    for event_type in EVENT_TYPES:
        keys = set(TYPED_EVENTS[event_type].__required_keys__)
        assert keys == set(sample(event_type)), event_type


@pytest.mark.parametrize(
    ("args", "fields", "words"),
    [
        (("speakers", "cam1", 0), {}, "unknown event type"),
        (("track_start", "cam1", 0), {"track_id": 1}, "missing box"),
        (("track_start", "cam1", 0), {"track_id": 1, "box": BOX, "score": 1.0}, "unexpected score"),
        (("track_start", None, 0), {"track_id": 1, "box": BOX}, "needs a stream_id"),
        (("track_start", "cam1", 0), {"track_id": 1, "box": [1, 2, 3]}, "4 numbers"),
        (("track_start", "cam1", 0), {"track_id": 1.5, "box": BOX}, "track_id"),
        (("track_start", "cam1", 0.5), {"track_id": 1, "box": BOX}, "integer"),
        (("dropped", "cam1", None), {"count": 1}, "server notice"),
        (("dropped", None, 5), {"count": 1}, "server notice"),
        (("error", None, None), {"message": "x", "code": "oops"}, "must be one of"),
        (("stream", "cam1", 0), {"state": "up", "source": "x", "message": None}, "must be one"),
        (
            ("stream", "cam1", 0),
            {"state": "started", "source": "rtsp://user:pw@cam/live", "message": None},
            "credentials",
        ),
        (
            ("speaker", "cam1", 0),
            {"track_id": 1, "box": BOX, "score": math.nan, "state": "speaking", "since_pts_ns": 0},
            "finite",
        ),
        (
            ("speaker", "cam1", 0),
            {"track_id": 1, "box": BOX, "score": 2.0, "state": "speaking", "since_pts_ns": 0},
            "<= 1.0",
        ),
    ],
)
def test_make_event_refuses_bad_events(
    args: tuple[str, str | None, Any], fields: dict[str, Any], words: str
) -> None:
    with pytest.raises(ValueError, match=words):
        make_event(*args, **fields)


def test_make_event_turns_numpy_values_into_plain_json() -> None:
    event = make_event(
        "speaker",
        "cam1",
        np.int64(40_000_000),  # type: ignore[arg-type]  # NumPy integers are accepted too
        track_id=np.int32(2),
        box=np.array([1, 2, 3, 4], dtype=np.float32),
        score=np.float32(0.5),
        state="speaking",
        since_pts_ns=np.int64(0),
        wall_time_ns=123,
    )
    assert event["box"] == [1.0, 2.0, 3.0, 4.0] and type(event["box"][0]) is float
    assert type(event["track_id"]) is int and type(event["score"]) is float
    assert event["pts_ns"] == 40_000_000 and event["wall_time_ns"] == 123
    json.dumps(event, allow_nan=False)


def test_watch_describes_every_sample_in_one_line() -> None:
    for event_type, *_ in SAMPLES:
        line = describe(sample(event_type))
        assert "\n" not in line and not line.rstrip().endswith("}"), line
    assert "track 2 [10,20,110,140] score 0.91" in describe(sample("speaker"))
    assert "track 2 -120 ms (-3 frames) conf 4.1" in describe(sample("sync"))
    assert "track 3 is Katie Hill, face 0.91, voice match 0.12" in describe(sample("identity"))
    assert describe(sample("speaker")).lstrip().startswith("12.48s  cam1")
    newer = {"type": "gaze", "stream_id": "cam1", "pts_ns": 0, "target": 1}
    assert describe(newer).endswith(json.dumps(newer))


# -- the hub, without sockets ----------------------------------------------------------------


async def test_hub_drops_oldest_and_announces_the_count_once() -> None:
    hub = EventHub(max_queue=4)
    slow, other = hub.subscribe(), hub.subscribe(max_queue=100)
    for index in range(10):
        hub.publish(make_event("track_start", "cam1", index, track_id=index, box=BOX))
    assert hub.published == 10 and slow.dropped == 6 and other.dropped == 0
    assert hub.client_drops() == {slow.name: 6, other.name: 0}
    notice = json.loads(await slow.recv())
    assert notice["type"] == "dropped" and notice["count"] == 6
    assert [json.loads(await slow.recv())["pts_ns"] for _ in range(4)] == [6, 7, 8, 9]
    assert [json.loads(await other.recv())["pts_ns"] for _ in range(10)] == list(range(10))
    # Serialised once per publish: every subscriber gets the very same text object.
    hub.publish(make_event("track_start", "cam1", 99, track_id=1, box=BOX))
    assert await slow.recv() is await other.recv()
    hub.unsubscribe(slow)
    hub.unsubscribe(slow)  # idempotent
    assert hub.subscriptions == (other,)


def test_hub_filters_by_stream_and_type_and_lets_notices_through() -> None:
    hub = EventHub()
    subscription = hub.subscribe(streams=["cam2"], types=["sync", "stats"])
    assert subscription.wants("sync", "cam2") and not subscription.wants("sync", "cam1")
    assert not subscription.wants("speaker", "cam2")
    assert subscription.wants("stats", None)  # server-wide stats pass the stream filter
    assert subscription.wants("dropped", None) and subscription.wants("error", None)
    hub.add_stream("cam1")
    hub.add_stream("cam1")
    hub.remove_stream("cam9")
    assert hub.streams == frozenset({"cam1"})


# -- the server -------------------------------------------------------------------------------


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Poll ``predicate`` on the loop until it holds."""
    async with asyncio.timeout(scaled(timeout_s)):
        while not predicate():  # noqa: ASYNC110 - polls the server's state from outside
            await asyncio.sleep(0.005)


async def recv_json(ws: ClientConnection, timeout_s: float = 5.0) -> dict[str, Any]:
    async with asyncio.timeout(scaled(timeout_s)):
        data = json.loads(await ws.recv())
    assert isinstance(data, dict)
    return data


def mixed_events() -> list[dict[str, Any]]:
    """Events of two streams and of the server, of several types."""
    events = []
    for index in range(3):
        for stream in ("cam1", "cam2"):
            events.append(make_event("track_start", stream, index, track_id=index, box=BOX))
            events.append(sample("speaker") | {"stream_id": stream, "pts_ns": index})
            events.append(sample("sync") | {"stream_id": stream, "pts_ns": index})
    events.append(sample("stats", 1))
    return events


async def test_a_client_that_sends_nothing_receives_every_stream() -> None:
    hub = EventHub()
    hub.add_stream("cam1")
    hub.add_stream("cam2")
    async with EventServer(hub) as server, connect(server.url) as ws:
        hello = await recv_json(ws)
        assert hello["type"] == "hello" and hello["streams"] == ["cam1", "cam2"]
        assert hello["event_types"] == list(EVENT_TYPES)
        await wait_until(lambda: len(hub.subscriptions) == 1)
        sent = mixed_events()
        for event in sent:
            hub.publish(event)
        received = [await recv_json(ws) for _ in sent]
        assert received == sent


async def test_a_subscribed_client_receives_only_its_streams_and_types() -> None:
    hub = EventHub()
    async with EventServer(hub) as server, TalkscopeClient(server.url) as client:
        ack = await client.subscribe(streams=["cam2"], types=["sync", "stats"])
        assert ack["type"] == "subscribed" and ack["streams"] == ["cam2"]
        assert ack["events"] == ["stats", "sync"]
        sent = mixed_events()
        for event in sent:
            hub.publish(event)
        hub.publish(make_event("stream", "cam2", 9, state="ended", source="x", message=None))
        hub.publish(sample("sync") | {"stream_id": "cam2", "pts_ns": 100})  # the last one
        received = []
        async with asyncio.timeout(scaled(5)):
            async for event in client.events():
                received.append(event)
                if event["pts_ns"] == 100:
                    break
        wanted = [e for e in sent if e["type"] in {"sync", "stats"} and e["stream_id"] != "cam1"]
        assert received[:-1] == wanted and len(wanted) == 4

        # events() with a filter subscribes first; a bad filter is refused by the server.
        with pytest.raises(ClientError, match="unknown event type"):
            async for _ in client.events(types=["speaker", "nope"]):
                pass

        async def publish_once_subscribed() -> None:
            await wait_until(lambda: hub.subscriptions[0].types == frozenset({"speaker"}))
            hub.publish(sample("sync"))
            hub.publish(sample("speaker"))

        async with asyncio.TaskGroup() as group:
            group.create_task(publish_once_subscribed())
            async with asyncio.timeout(scaled(5)):
                async for event in client.events(types=["speaker"]):
                    assert event["type"] == "speaker"
                    break


async def test_token_is_required_and_accepted_by_query_or_header() -> None:
    hub = EventHub()
    async with EventServer(hub, token="s3cret") as server:
        for url, headers in [
            (server.url, None),
            (server.url + "?token=wrong", None),
            (server.url, {"Authorization": "Bearer wrong"}),
            (server.url, {"Authorization": "Basic czNjcmV0"}),
        ]:
            with pytest.raises(InvalidStatus) as refused:
                async with connect(url, additional_headers=headers):
                    pass
            assert refused.value.response.status_code == 401
        for url, headers in [
            (server.url + "?token=s3cret", None),
            (server.url, {"Authorization": "Bearer s3cret"}),
        ]:
            async with connect(url, additional_headers=headers) as ws:
                assert (await recv_json(ws))["type"] == "hello"
        with pytest.raises(TokenRefused) as error:
            async with TalkscopeClient(server.url, token="wrong"):
                pass
        assert isinstance(error.value, PermissionError)
        async with TalkscopeClient(server.url, token="s3cret") as client:
            assert client.hello["server"].startswith("talkscope")


async def test_client_errors_are_typed() -> None:
    with pytest.raises(BadURL):
        TalkscopeClient("ftp://127.0.0.1/x")
    assert events_url("http://127.0.0.1:8765") == "ws://127.0.0.1:8765/events"
    assert events_url("wss://h/custom?x=1") == "wss://h/custom?x=1"
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ServerUnreachable) as unreachable:
        async with TalkscopeClient(f"ws://127.0.0.1:{port}"):
            pass
    assert unreachable.value.retryable
    async with EventServer(EventHub()) as server:
        with pytest.raises(ClientError, match="HTTP 404") as not_found:
            async with TalkscopeClient(server.url.replace("/events", "/nope")):
                pass
        assert not isinstance(not_found.value, TokenRefused)


async def test_a_slow_client_loses_events_and_slows_nobody() -> None:
    total, batch = 20_000, 100
    hub = EventHub()
    hub.add_stream("cam1")
    events = [sample("speaker") | {"pts_ns": index} for index in range(total)]
    async with EventServer(hub) as server:
        # The slow client never reads until the end; a small receive buffer fills quickly.
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.connect(("127.0.0.1", server.port))
        raw.setblocking(False)
        async with (
            connect(server.url, sock=raw, max_queue=1) as slow,
            connect(server.url) as fast,
        ):
            assert (await recv_json(slow))["type"] == "hello"
            assert (await recv_json(fast))["type"] == "hello"
            await wait_until(lambda: len(hub.subscriptions) == 2)
            slow_subscription = hub.subscriptions[0]
            publish_s = worst_s = 0.0
            for start in range(0, total, batch):
                for event in events[start : start + batch]:
                    began = time.perf_counter()
                    hub.publish(event)
                    took = time.perf_counter() - began
                    publish_s, worst_s = publish_s + took, max(worst_s, took)
                # The fast client reads everything, in order, at its own pace.
                for index in range(start, start + batch):
                    assert (await recv_json(fast))["pts_ns"] == index
            assert publish_s < scaled(2.0), f"{total} publishes took {publish_s:.2f} s"
            assert worst_s < scaled(0.1), f"one publish took {worst_s * 1000:.0f} ms"
            assert slow_subscription.dropped > 0
            assert hub.client_drops()[slow_subscription.name] == slow_subscription.dropped

            # Now the slow client reads: what it got plus what it was told it lost is all.
            got, lost, notices, last = 0, 0, 0, -1
            async with asyncio.timeout(scaled(20)):
                while got + lost < total:
                    event = json.loads(await slow.recv())
                    if event["type"] == "dropped":
                        notices, lost = notices + 1, lost + event["count"]
                    else:
                        assert event["pts_ns"] > last
                        got, last = got + 1, event["pts_ns"]
            assert notices >= 1 and lost == slow_subscription.dropped > 0
            assert got + lost == total and last == total - 1


async def test_hostile_messages_get_errors_and_the_server_keeps_serving() -> None:
    hub = EventHub()
    hub.add_stream("cam1")
    async with (
        EventServer(hub) as server,
        connect(server.url, max_size=None) as ws,
        connect(server.url) as bystander,
    ):
        await recv_json(ws)
        await recv_json(bystander)

        async def ask(message: str | bytes) -> dict[str, Any]:
            await ws.send(message)
            return await recv_json(ws)

        cases: list[tuple[str | bytes, str]] = [
            ("{not json", "bad_json"),
            ("[1, 2]", "bad_request"),
            ('"a string"', "bad_request"),
            ('{"type": "dance"}', "bad_request"),
            ('{"no": "type"}', "bad_request"),
            (b"\x00\x01binary", "bad_request"),
            ("[" * 30_000 + "]" * 30_000, "bad_json"),  # deeper than the JSON parser recurses
            ("x" * 10_000_000, "too_large"),
            ("é" * 40_000, "too_large"),  # 40 000 characters, 80 000 bytes
            (json.dumps({"type": "subscribe", "streams": [str(i) for i in range(5000)]}), ""),
            ('{"type": "subscribe", "events": ["speaker", "nope"]}', "bad_request"),
            ('{"type": "subscribe", "streams": "cam1"}', "bad_request"),
            ('{"type": "subscribe", "streams": [1, 2]}', "bad_request"),
            ('{"type": "subscribe", "stream": ["cam1"]}', "bad_request"),
        ]
        for message, code in cases:
            reply = await ask(message)
            assert reply["type"] == "error", (message[:40], reply)
            assert reply["code"] == (code or "too_many"), (message[:40], reply)
            assert reply["stream_id"] is None and len(reply["message"]) < 200
        assert (await ask('{"type": "ping"}'))["type"] == "pong"

        # 1000 subscribe messages in a row: every one is answered, acked or rate limited.
        flood = json.dumps({"type": "subscribe", "streams": None, "events": None})
        replies: list[dict[str, Any]] = []

        async def read_replies() -> None:
            while len(replies) < 1000:
                replies.append(await recv_json(ws))

        async with asyncio.TaskGroup() as group:
            group.create_task(read_replies())
            for _ in range(1000):
                await ws.send(flood)
        kinds = {(r["type"], r.get("code")) for r in replies}
        assert kinds <= {("subscribed", None), ("error", "rate_limited")}
        assert ("subscribed", None) in kinds

        # Both clients still get events, and a newcomer is served.
        hub.publish(sample("speaker"))
        assert (await recv_json(ws))["type"] == "speaker"
        assert (await recv_json(bystander))["type"] == "speaker"
        async with connect(server.url) as newcomer:
            assert (await recv_json(newcomer))["type"] == "hello"

        hub.publish(sample("sync"))
        assert (await recv_json(bystander))["type"] == "sync"


async def test_a_message_beyond_max_frame_bytes_is_closed_with_1009() -> None:
    # A raw socket announces a 16 MiB + 1 text frame and sends none of it: websockets refuses
    # the frame on its header and closes with 1009 (message too big).
    async with EventServer(EventHub()) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(
                b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"Sec-WebSocket-Version: 13\r\n\r\n"
            )
            async with asyncio.timeout(scaled(5)):
                assert b" 101 " in await reader.readuntil(b"\r\n\r\n")
                size = server.max_frame_bytes + 1
                writer.write(bytes([0x81, 0x80 | 127]) + size.to_bytes(8, "big") + bytes(4))
                while True:  # server frames are not masked
                    first, second = await reader.readexactly(2)
                    length = second & 0x7F
                    if length >= 126:
                        length = int.from_bytes(await reader.readexactly(2 if length == 126 else 8))
                    payload = await reader.readexactly(length)
                    if first & 0x0F == 0x8:
                        break
            assert int.from_bytes(payload[:2]) == 1009
        finally:
            writer.close()
            await writer.wait_closed()


async def test_a_broken_connection_removes_that_client_only() -> None:
    hub = EventHub()
    async with EventServer(hub) as server, connect(server.url) as keeper:
        await recv_json(keeper)
        async with connect(server.url) as breaker:
            await recv_json(breaker)
            await wait_until(lambda: server.clients == 2)
            breaker.transport.abort()  # no closing handshake: the TCP connection just ends
            await wait_until(lambda: server.clients == 1 and len(hub.subscriptions) == 1)
        hub.publish(sample("speaker"))
        assert (await recv_json(keeper))["type"] == "speaker"


async def test_a_taken_port_and_a_non_json_event_are_refused_clearly() -> None:
    hub = EventHub()
    async with EventServer(hub) as server:
        with pytest.raises(UsageError, match=f"cannot listen on 127.0.0.1:{server.port}"):
            async with EventServer(hub, port=server.port):
                pass
    hub.subscribe()
    with pytest.raises(ValueError, match="not JSON"):
        hub.publish({"type": "speaker", "stream_id": "cam1", "score": math.nan})
    with pytest.raises(ValueError, match="not an event"):
        hub.publish({"score": 1.0})


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
    """Status, content type and body of a plain HTTP GET (run it in a thread)."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=scaled(5)) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers["Content-Type"], error.read()


async def test_http_routes() -> None:
    hub = EventHub()
    hub.add_stream("cam1")
    async with EventServer(hub, token="s3cret") as server:
        base = f"http://127.0.0.1:{server.port}"
        status, kind, body = await asyncio.to_thread(http_get, base + "/schema.json")
        assert status == 200 and kind == "application/json"
        assert json.loads(body) == json_schema()
        status, kind, body = await asyncio.to_thread(http_get, base + "/")
        assert status == 200 and kind.startswith("text/html")
        assert b"<title>talkscope" in body and b"app.js" in body
        for path, kind_prefix in (("/app.js", "text/javascript"), ("/style.css", "text/css")):
            status, kind, body = await asyncio.to_thread(http_get, base + path)
            assert status == 200 and kind.startswith(kind_prefix) and body
        status, _, _ = await asyncio.to_thread(http_get, base + "/health")
        assert status == 401
        status, _, _ = await asyncio.to_thread(http_get, base + "/health?token=wrong")
        assert status == 401
        async with connect(server.url + "?token=s3cret") as ws:
            await recv_json(ws)
            auth = {"Authorization": "Bearer s3cret"}
            status, kind, body = await asyncio.to_thread(http_get, base + "/health", auth)
        assert status == 200 and kind == "application/json"
        assert json.loads(body) == {"ok": True, "streams": ["cam1"], "clients": 1}
        status, _, _ = await asyncio.to_thread(http_get, base + "/health?token=s3cret")
        assert status == 200
        status, _, _ = await asyncio.to_thread(http_get, base + "/nope")
        assert status == 404


async def test_aclose_says_going_away_and_is_bounded_even_for_a_stuck_client() -> None:
    hub = EventHub()
    server = EventServer(hub, close_timeout_s=0.3)
    async with server:
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.connect(("127.0.0.1", server.port))
        raw.setblocking(False)
        async with (
            connect(server.url) as polite,
            connect(server.url, sock=raw, max_queue=1) as stuck,
        ):
            await recv_json(polite)
            await recv_json(stuck)
            await wait_until(lambda: len(hub.subscriptions) == 2)
            stuck_subscription = hub.subscriptions[1]
            # Fill the stuck client's socket until its sender is blocked and its queue drops.
            while stuck_subscription.dropped == 0:
                for index in range(100):
                    hub.publish(sample("speaker") | {"pts_ns": index})
                while (await recv_json(polite))["pts_ns"] != 99:
                    pass
            # And a connection that never even sends its handshake.
            _, silent = await asyncio.open_connection("127.0.0.1", server.port)
            began = time.monotonic()
            await server.aclose()
            took = time.monotonic() - began
            assert took < scaled(0.3 + 1.0 + 1.5), f"aclose took {took:.2f} s"
            with pytest.raises(ConnectionClosedOK):
                async with asyncio.timeout(scaled(5)):
                    await polite.recv()
            assert polite.close_code == 1001
            with pytest.raises(ConnectionClosed):  # aborted: what it had, then the end
                async with asyncio.timeout(scaled(5)):
                    while True:
                        await stuck.recv()
            began = time.monotonic()
            await server.aclose()  # idempotent and immediate
            assert time.monotonic() - began < scaled(0.1)
            assert hub.subscriptions == ()
            silent.close()
            await silent.wait_closed()
    # __aexit__ called aclose a third time: still fine.


# -- watch, as a real process -------------------------------------------------------------------


async def watch(*args: str, token_env: str | None = None) -> asyncio.subprocess.Process:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TALKSCOPE_TOKEN", None)
    if token_env is not None:
        env["TALKSCOPE_TOKEN"] = token_env
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "clients.watch",
        *args,
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def finish(process: asyncio.subprocess.Process) -> tuple[int, str, str]:
    async with asyncio.timeout(scaled(20)):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_watch_prints_events_until_the_server_closes() -> None:
    hub = EventHub()
    hub.add_stream("cam1")
    sent = [sample(t) for t in ("stream", "track_start", "speaker", "sync", "stats", "track_end")]
    sent.append(sample("sync", 1))
    async with EventServer(hub, token="s3cret") as server:
        as_json = await watch(server.url, "--json", "--token", "s3cret")
        as_text = await watch(server.url, token_env="s3cret")
        await wait_until(lambda: len(hub.subscriptions) == 2, timeout_s=20)
        for event in sent:
            hub.publish(event)
        await wait_until(
            lambda: all(s.delivered == len(sent) and not s.queued for s in hub.subscriptions)
        )
    code, out, err = await finish(as_json)
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines[0]["type"] == "hello" and lines[0]["streams"] == ["cam1"]
    assert lines[1:] == sent
    code, out, err = await finish(as_text)
    assert code == 0, err
    text = out.splitlines()
    assert len(text) == 1 + len(sent) and "talkscope" in text[0]
    assert any("speaker     track 2 [10,20,110,140] score 0.91" in line for line in text)
    assert any("sync        track 2 -120 ms (-3 frames) conf 4.1" in line for line in text)
    assert any("track 3 unknown: too few windows" in line for line in text)


async def test_watch_exit_codes_for_refusals_and_interrupts() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    async with EventServer(EventHub(), token="s3cret") as server:
        refused = await watch(server.url, "--token", "wrong")
        unreachable = await watch(f"ws://127.0.0.1:{closed_port}")
        bad_url = await watch("ftp://127.0.0.1/events")
        bad_type = await watch(server.url, "--type", "nope")
        interrupted = await watch(server.url, "--token", "s3cret")
        for process, words in [
            (refused, "token"),
            (unreachable, "cannot connect"),
            (bad_url, "not a ws://"),
        ]:
            code, out, err = await finish(process)
            assert code == 2 and out == "", err
            assert len(err.splitlines()) == 1 and words in err and "Traceback" not in err
        code, _, err = await finish(bad_type)
        assert code == 2 and "invalid choice" in err
        await wait_until(lambda: server.clients == 1, timeout_s=20)
        assert interrupted.stdout is not None
        async with asyncio.timeout(scaled(5)):
            assert "talkscope" in (await interrupted.stdout.readline()).decode()
        interrupted.send_signal(signal.SIGINT)
        code, _, err = await finish(interrupted)
        assert code == 130 and "interrupted" in err and "Traceback" not in err
