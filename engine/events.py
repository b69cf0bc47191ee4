"""The event schema: the one definition of what the engine tells its clients.

Every event is a JSON object with five common fields, then the fields of its type::

    type            str        one of EVENT_TYPES
    schema_version  int        SCHEMA_VERSION (bumped on any incompatible change)
    stream_id       str|null   the stream the event is about; null for server notices
    pts_ns          int|null   media time of the newest media the event describes, in ns
                               (the source's own clock); null for server notices
    wall_time_ns    int        unix epoch ns when the event was made

Types made by the pipeline (a client can filter on them): ``stream``, ``track_start``,
``track_end``, ``speaker``, ``sync``, ``identity`` and ``stats``. Notices the server sends to
one client (always delivered, whatever the client's filter): ``hello``, ``subscribed``,
``dropped``, ``error`` and ``pong``. Boxes are ``[x0, y0, x1, y1]`` in source pixels. Every
field of a type is always present; "unknown" is an explicit null, never a missing key.

:func:`make_event` is the only constructor: it fills the common fields, checks that exactly the
fields of the type are given, converts NumPy scalars and tuples to plain JSON values, and refuses
values the schema refuses (wrong enum, NaN, a box that is not 4 numbers). :func:`json_schema`
renders the same field table as JSON Schema (draft 2020-12); ``docs/events.schema.json`` is that
output, and a test keeps it current. Regenerate it with::

    python -c "from engine.events import write_schema; write_schema('docs/events.schema.json')"

Clients send two kinds of message (described under ``$defs/client_message`` in the schema):
``{"type": "subscribe", "streams": [...] | null, "events": [...] | null}`` and
``{"type": "ping"}``.

This module imports nothing beyond the standard library, so clients can use it without the
engine's media dependencies.
"""

from __future__ import annotations

import json
import math
import numbers
import operator
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypedDict
from urllib.parse import urlsplit

SCHEMA_VERSION = 1
"""Version of the event schema; every event carries it in ``schema_version``."""

STREAM_STATES = ("started", "stalled", "reconnecting", "ended", "error")
SPEAKER_STATES = ("speaking", "silent", "offscreen")
SYNC_STATES = ("ok", "unknown")
ERROR_CODES = ("bad_json", "too_large", "bad_request", "too_many", "rate_limited")
"""Codes of ``error`` notices: unparsable JSON, a message over the size limit, a message the
protocol does not allow, a subscription listing too many entries, a client sending too fast."""

PIPELINE_EVENT_TYPES = (
    "stream",
    "track_start",
    "track_end",
    "speaker",
    "sync",
    "identity",
    "stats",
)
"""Event types the pipeline publishes; clients filter on these."""
NOTICE_TYPES = ("hello", "subscribed", "dropped", "error", "pong")
"""Server-to-one-client notices; ``stream_id`` and ``pts_ns`` are always null."""
EVENT_TYPES: tuple[str, ...] = PIPELINE_EVENT_TYPES + NOTICE_TYPES
"""Every event type, in schema order."""

SCHEMA_ID = "urn:talkscope:events:v1"

# -- typed views (for clients and type checkers; make_event returns plain dicts) -------------

Box = list[float]
"""``[x0, y0, x1, y1]`` in source pixels."""


class _Common(TypedDict):
    schema_version: int
    stream_id: str | None
    pts_ns: int | None
    wall_time_ns: int


class StreamEvent(_Common):
    """A stream's state changed (``source`` has its credentials redacted)."""

    type: Literal["stream"]
    state: Literal["started", "stalled", "reconnecting", "ended", "error"]
    source: str
    message: str | None


class TrackStartEvent(_Common):
    """A face track was confirmed."""

    type: Literal["track_start"]
    track_id: int
    box: Box


class TrackEndEvent(_Common):
    """A face track ended after ``frames`` video frames."""

    type: Literal["track_end"]
    track_id: int
    box: Box
    frames: int


class SpeakerEvent(_Common):
    """Who speaks now: a track, nobody (``silent``), or a voice with no visible face."""

    type: Literal["speaker"]
    track_id: int | None
    box: Box | None
    score: float
    state: Literal["speaking", "silent", "offscreen"]
    since_pts_ns: int | None


class SyncEvent(_Common):
    """The audio-video offset of one track over a sliding window (positive = audio leads)."""

    type: Literal["sync"]
    track_id: int
    state: Literal["ok", "unknown"]
    offset_frames: int | None
    offset_ms: float | None
    confidence: float | None
    min_dist: float | None
    window_s: float
    frames: int
    reason: str | None
    box: Box


class IdentityEvent(_Common):
    """Who a face (or an off-screen voice) is, and whether the current speech is theirs."""

    type: Literal["identity"]
    track_id: int | None
    identity_id: int
    name: str | None
    face_score: float | None
    voice_match: float | None
    evidence_s: float


class StagePercentiles(TypedDict):
    """Per-stage processing time percentiles, ms (null before any sample)."""

    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None


class LatencyPercentiles(TypedDict):
    """End-to-end latency percentiles, ms (null before any sample)."""

    p50: float | None
    p95: float | None
    p99: float | None


class StatsEvent(_Common):
    """Periodic health of a stream (or of the whole server when ``stream_id`` is null)."""

    type: Literal["stats"]
    stages: dict[str, StagePercentiles]
    queues: dict[str, int]
    drops: dict[str, int]
    latency_ms: LatencyPercentiles


class HelloEvent(_Common):
    """The first message of every connection."""

    type: Literal["hello"]
    streams: list[str]
    event_types: list[str]
    server: str


class SubscribedEvent(_Common):
    """The answer to a ``subscribe`` message: the filter now in force (null = all)."""

    type: Literal["subscribed"]
    streams: list[str] | None
    events: list[str] | None


class DroppedEvent(_Common):
    """This client lost ``count`` events because it read too slowly."""

    type: Literal["dropped"]
    count: int


class ErrorEvent(_Common):
    """A client message was refused; the connection stays open."""

    type: Literal["error"]
    message: str
    code: Literal["bad_json", "too_large", "bad_request", "too_many", "rate_limited"]


class PongEvent(_Common):
    """The answer to an application-level ``ping`` message."""

    type: Literal["pong"]


Event = (
    StreamEvent
    | TrackStartEvent
    | TrackEndEvent
    | SpeakerEvent
    | SyncEvent
    | IdentityEvent
    | StatsEvent
    | HelloEvent
    | SubscribedEvent
    | DroppedEvent
    | ErrorEvent
    | PongEvent
)
"""Any event, typed; narrow it on ``event["type"]``."""

TYPED_EVENTS: dict[str, type[Any]] = {
    "stream": StreamEvent,
    "track_start": TrackStartEvent,
    "track_end": TrackEndEvent,
    "speaker": SpeakerEvent,
    "sync": SyncEvent,
    "identity": IdentityEvent,
    "stats": StatsEvent,
    "hello": HelloEvent,
    "subscribed": SubscribedEvent,
    "dropped": DroppedEvent,
    "error": ErrorEvent,
    "pong": PongEvent,
}
"""The TypedDict of each event type (a test checks they match the field table)."""

# -- the field table: one source for make_event's checks and for the JSON Schema ------------


@dataclass(frozen=True, slots=True)
class _Field:
    """One field: its JSON Schema and the function that checks and converts a value."""

    schema: dict[str, Any]
    convert: Callable[[Any], Any]


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def _int_value(value: Any, minimum: int | None) -> int:
    if isinstance(value, bool):
        raise TypeError(f"expected an integer, got {value!r}")
    number = operator.index(value)  # int and NumPy integers; floats are refused
    if minimum is not None and number < minimum:
        raise ValueError(f"must be >= {minimum}, got {number}")
    return number


def _float_value(value: Any, minimum: float | None, maximum: float | None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"expected a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"must be finite, got {number}")  # JSON has no NaN or Infinity
    if minimum is not None and number < minimum:
        raise ValueError(f"must be >= {minimum}, got {number}")
    if maximum is not None and number > maximum:
        raise ValueError(f"must be <= {maximum}, got {number}")
    return number


def _str_value(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def _maybe(convert: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: None if value is None else convert(value)


def _integer(*, minimum: int | None = 0, nullable: bool = False) -> _Field:
    schema: dict[str, Any] = {"type": "integer"}
    if minimum is not None:
        schema["minimum"] = minimum

    def convert(value: Any) -> int:
        return _int_value(value, minimum)

    if nullable:
        return _Field(_nullable(schema), _maybe(convert))
    return _Field(schema, convert)


def _number(
    *, minimum: float | None = None, maximum: float | None = None, nullable: bool = False
) -> _Field:
    schema: dict[str, Any] = {"type": "number"}
    if minimum is not None:
        schema["minimum"] = minimum
    if maximum is not None:
        schema["maximum"] = maximum

    def convert(value: Any) -> float:
        return _float_value(value, minimum, maximum)

    if nullable:
        return _Field(_nullable(schema), _maybe(convert))
    return _Field(schema, convert)


def _string(*, nullable: bool = False) -> _Field:
    if nullable:
        return _Field(_nullable({"type": "string"}), _maybe(_str_value))
    return _Field({"type": "string"}, _str_value)


def _enum(values: tuple[str, ...]) -> _Field:
    def convert(value: Any) -> str:
        if value not in values:
            raise ValueError(f"must be one of {', '.join(values)}; got {value!r}")
        return str(value)

    return _Field({"enum": list(values)}, convert)


def _box_value(value: Any) -> list[float]:
    if isinstance(value, str | bytes) or not hasattr(value, "__len__") or len(value) != 4:
        raise ValueError(f"a box is 4 numbers [x0, y0, x1, y1], got {value!r}")
    return [_float_value(v, None, None) for v in value]


def _box(*, nullable: bool = False) -> _Field:
    ref = {"$ref": "#/$defs/box"}
    if nullable:
        return _Field(_nullable(ref), _maybe(_box_value))
    return _Field(ref, _box_value)


def _string_list(*, nullable: bool = False) -> _Field:
    schema = {"type": "array", "items": {"type": "string"}}

    def convert(value: Any) -> list[str]:
        if isinstance(value, str | bytes | Mapping):
            raise TypeError(f"expected a list of strings, got {value!r}")
        return [_str_value(item) for item in value]

    if nullable:
        return _Field(_nullable(schema), _maybe(convert))
    return _Field(schema, convert)


def _count_map() -> _Field:
    """An object of name -> non-negative integer (queue depths, drop counts)."""

    def convert(value: Any) -> dict[str, int]:
        if not isinstance(value, Mapping):
            raise TypeError(f"expected an object, got {value!r}")
        return {_str_value(k): _int_value(v, 0) for k, v in value.items()}

    schema = {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}}
    return _Field(schema, convert)


def _percentiles_value(value: Any, keys: tuple[str, ...]) -> dict[str, float | None]:
    if not isinstance(value, Mapping) or set(value) != set(keys):
        raise ValueError(f"expected an object with exactly {', '.join(keys)}, got {value!r}")
    return {k: None if value[k] is None else _float_value(value[k], 0.0, None) for k in keys}


_STAGE_KEYS = ("p50_ms", "p95_ms", "p99_ms")
_LATENCY_KEYS = ("p50", "p95", "p99")


def _stage_map() -> _Field:
    def convert(value: Any) -> dict[str, dict[str, float | None]]:
        if not isinstance(value, Mapping):
            raise TypeError(f"expected an object, got {value!r}")
        return {_str_value(k): _percentiles_value(v, _STAGE_KEYS) for k, v in value.items()}

    schema = {"type": "object", "additionalProperties": {"$ref": "#/$defs/stage_percentiles"}}
    return _Field(schema, convert)


def _latency() -> _Field:
    return _Field(
        {"$ref": "#/$defs/latency_percentiles"},
        lambda value: _percentiles_value(value, _LATENCY_KEYS),
    )


_FIELDS: dict[str, dict[str, _Field]] = {
    "stream": {
        "state": _enum(STREAM_STATES),
        "source": _string(),
        "message": _string(nullable=True),
    },
    "track_start": {"track_id": _integer(), "box": _box()},
    "track_end": {"track_id": _integer(), "box": _box(), "frames": _integer()},
    "speaker": {
        "track_id": _integer(nullable=True),
        "box": _box(nullable=True),
        "score": _number(minimum=0.0, maximum=1.0),
        "state": _enum(SPEAKER_STATES),
        "since_pts_ns": _integer(minimum=None, nullable=True),
    },
    "sync": {
        "track_id": _integer(),
        "state": _enum(SYNC_STATES),
        "offset_frames": _integer(minimum=None, nullable=True),
        "offset_ms": _number(nullable=True),
        "confidence": _number(nullable=True),
        "min_dist": _number(nullable=True),
        "window_s": _number(minimum=0.0),
        "frames": _integer(),
        "reason": _string(nullable=True),
        "box": _box(),
    },
    "identity": {
        "track_id": _integer(nullable=True),
        "identity_id": _integer(minimum=1),
        "name": _string(nullable=True),
        "face_score": _number(minimum=-1.0, maximum=1.0, nullable=True),
        "voice_match": _number(minimum=-1.0, maximum=1.0, nullable=True),
        "evidence_s": _number(minimum=0.0),
    },
    "stats": {
        "stages": _stage_map(),
        "queues": _count_map(),
        "drops": _count_map(),
        "latency_ms": _latency(),
    },
    "hello": {
        "streams": _string_list(),
        "event_types": _string_list(),
        "server": _string(),
    },
    "subscribed": {
        "streams": _string_list(nullable=True),
        "events": _string_list(nullable=True),
    },
    "dropped": {"count": _integer()},
    "error": {"message": _string(), "code": _enum(ERROR_CODES)},
    "pong": {},
}

_DESCRIPTIONS = {
    "stream": "A stream's state changed; source is the URL without credentials.",
    "track_start": "A face track was confirmed; box is [x0, y0, x1, y1] in source pixels.",
    "track_end": "A face track ended after `frames` video frames.",
    "speaker": (
        "The active speaker: a track (speaking), nobody (silent), or speech with no visible "
        "face that matches (offscreen). since_pts_ns is when this state began."
    ),
    "sync": (
        "Audio-video offset of one track over a sliding window of window_s seconds; positive "
        "= audio leads the lips. state unknown comes with a reason and null estimates. box is the "
        "track's box at the end of the window."
    ),
    "identity": (
        "Who a face track is (track_id), or an off-screen voice (track_id null): identity_id "
        "is stable within the stream (a face that leaves and comes back gets it again); name "
        "is the enrolled name or null; face_score is the face cosine to whom it was recognised "
        "as (null when new); voice_match is P(the current speech is this face's voice), "
        "calibrated, null without recent speech (for an off-screen voice: the voice cosine to "
        "the voice it was recognised as); evidence_s is the seconds of face and voice behind it."
    ),
    "stats": "Stage, queue, drop and end-to-end latency figures of a stream (or the server).",
    "hello": "First message of every connection: known streams and event types.",
    "subscribed": "Answer to a subscribe message: the filter now in force (null = all).",
    "dropped": "This client lost `count` events because it read too slowly.",
    "error": "A client message was refused; the connection stays open.",
    "pong": "Answer to a ping message.",
}

assert tuple(_FIELDS) == EVENT_TYPES  # one table, one order


def _redacted(source: str) -> bool:
    """True when ``source`` carries no user name or password."""
    try:
        parts = urlsplit(source)
    except ValueError:
        return True  # not a URL at all (a path); nothing to redact
    return parts.username is None and parts.password is None


def make_event(
    event_type: str,
    stream_id: str | None,
    pts_ns: int | None,
    *,
    wall_time_ns: int | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """Build one event: the common fields, then exactly the fields of its type.

    Values are converted to plain JSON types on the way (NumPy scalars to int or float, tuples
    and arrays of 4 to box lists), so the result can go straight to ``json.dumps``.

    Args:
        event_type: one of :data:`EVENT_TYPES`.
        stream_id: the stream the event is about; None for server notices (and for stats of
            the whole server). Pipeline events other than ``stats`` need one.
        pts_ns: media time in ns of the newest media the event describes, or None when there
            is none; must be None for server notices.
        wall_time_ns: unix epoch ns; ``time.time_ns()`` when None (pass one to test with a
            fixed or virtual clock).
        **fields: the type's own fields, every one of them (None where the schema allows null).

    Returns:
        The event, a JSON-ready dict (a fresh one per call).

    Raises:
        ValueError: an unknown type, a missing or unexpected field, a value the schema
            refuses, a ``source`` with credentials in it, or a ``stream_id``/``pts_ns`` the
            type does not allow.
    """
    spec = _FIELDS.get(event_type)
    if spec is None:
        raise ValueError(f"unknown event type {event_type!r}; known: {', '.join(EVENT_TYPES)}")
    if fields.keys() != spec.keys():
        missing = sorted(spec.keys() - fields.keys())
        extra = sorted(fields.keys() - spec.keys())
        problems = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"unexpected {', '.join(extra)}"] if extra else []
        )
        raise ValueError(f"{event_type} event: {'; '.join(problems)}")
    if event_type in NOTICE_TYPES:
        if stream_id is not None or pts_ns is not None:
            raise ValueError(f"{event_type} is a server notice: stream_id and pts_ns are None")
    elif stream_id is None and event_type != "stats":
        raise ValueError(f"{event_type} event needs a stream_id")
    if stream_id is not None and not isinstance(stream_id, str):
        raise ValueError(f"stream_id must be a string, got {stream_id!r}")
    event: dict[str, Any] = {
        "type": event_type,
        "schema_version": SCHEMA_VERSION,
        "stream_id": stream_id,
        "pts_ns": None,
        "wall_time_ns": None,
    }
    try:
        event["pts_ns"] = None if pts_ns is None else _int_value(pts_ns, None)
        event["wall_time_ns"] = (
            time.time_ns() if wall_time_ns is None else _int_value(wall_time_ns, 0)
        )
    except (TypeError, ValueError) as error:
        raise ValueError(f"{event_type} event: {error}") from None
    for name, field in spec.items():
        try:
            event[name] = field.convert(fields[name])
        except (TypeError, ValueError) as error:
            raise ValueError(f"{event_type}.{name}: {error}") from None
    if event_type == "stream" and not _redacted(event["source"]):
        raise ValueError("stream.source has credentials: pass it through sources.kinds.redact")
    return event


# -- JSON Schema -----------------------------------------------------------------------------


def _common_schema(event_type: str) -> dict[str, Any]:
    notice = event_type in NOTICE_TYPES
    if notice:
        stream_id: dict[str, Any] = {"type": "null"}
    elif event_type == "stats":
        stream_id = {"type": ["string", "null"]}
    else:
        stream_id = {"type": "string"}
    return {
        "type": {"const": event_type},
        "schema_version": {"const": SCHEMA_VERSION},
        "stream_id": stream_id,
        "pts_ns": {"type": "null"} if notice else {"type": ["integer", "null"]},
        "wall_time_ns": {"type": "integer", "minimum": 0},
    }


def _percentiles_schema(keys: tuple[str, ...], what: str) -> dict[str, Any]:
    return {
        "description": f"{what} percentiles in ms; null before any sample.",
        "type": "object",
        "properties": {k: {"type": ["number", "null"], "minimum": 0} for k in keys},
        "required": list(keys),
        "additionalProperties": False,
    }


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of every event, built from the same table as make_event.

    The top level is a ``oneOf`` over the event types, each fixed by a ``const`` on ``type``,
    with every field required and no others allowed. ``$defs/client_message`` describes what
    clients may send.

    Returns:
        A fresh dict, JSON-ready.
    """
    defs: dict[str, Any] = {
        "box": {
            "description": "[x0, y0, x1, y1] in source pixels.",
            "type": "array",
            "items": {"type": "number"},
            "minItems": 4,
            "maxItems": 4,
        },
        "stage_percentiles": _percentiles_schema(_STAGE_KEYS, "Stage processing time"),
        "latency_percentiles": _percentiles_schema(_LATENCY_KEYS, "End-to-end latency"),
    }
    for event_type, spec in _FIELDS.items():
        properties = _common_schema(event_type)
        properties.update({name: field.schema for name, field in spec.items()})
        defs[event_type] = {
            "description": _DESCRIPTIONS[event_type],
            "type": "object",
            "properties": properties,
            "required": list(properties),
            "additionalProperties": False,
        }
    filter_list = {"type": ["array", "null"], "maxItems": 256}
    defs["client_message"] = {
        "description": "What a client may send: a subscription (null = all) or a ping.",
        "oneOf": [
            {
                "type": "object",
                "properties": {
                    "type": {"const": "subscribe"},
                    "streams": {**filter_list, "items": {"type": "string"}},
                    "events": {**filter_list, "items": {"enum": list(EVENT_TYPES)}},
                },
                "required": ["type"],
                "additionalProperties": False,
            },
            {
                "type": "object",
                "properties": {"type": {"const": "ping"}},
                "required": ["type"],
                "additionalProperties": False,
            },
        ],
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": f"talkscope event, schema version {SCHEMA_VERSION}",
        "description": (
            "One JSON object per WebSocket text message from the talkscope event server. "
            "pts_ns is media time (ns) of the newest media the event describes; wall_time_ns "
            "is unix epoch ns when the event was made."
        ),
        "oneOf": [{"$ref": f"#/$defs/{event_type}"} for event_type in EVENT_TYPES],
        "$defs": defs,
    }


def schema_text() -> str:
    """:func:`json_schema` as the text of ``docs/events.schema.json`` (2-space indent)."""
    return json.dumps(json_schema(), indent=2) + "\n"


def write_schema(path: str | Path) -> Path:
    """Write :func:`json_schema` to ``path`` (replacing it).

    Args:
        path: where to write, e.g. ``docs/events.schema.json``.

    Returns:
        The path written.
    """
    target = Path(path)
    target.write_text(schema_text(), encoding="utf-8")
    return target
