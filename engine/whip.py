"""WHIP ingest (RFC 9725): a WebRTC publisher becomes a stream of the live engine.

A publisher POSTs its SDP offer (``Content-Type: application/sdp``) to ``/whip``; the answer
comes back with ``201 Created``, a ``Location`` (the session's resource, ``/whip/<stream id>``)
and ``X-Talkscope-Stream-Id`` (the id its events carry). ``DELETE`` on the resource ends the
session. ICE is not trickled: aiortc gathers its candidates before answering, so the answer
holds them all, and ``PATCH`` gets 405 as the RFC allows. A stream id may be asked for with
``?stream=ID``; otherwise ``web-1``, ``web-2``, ... are given.

Answers: 400 for an offer that is not SDP or that aiortc cannot answer (no common codec, no
audio or video), 404 for an unknown resource, 409 for a stream id in use, 415 for another
content type, 503 (with ``Retry-After``) when ``max_publishers`` publish already. The token is
checked by the event server before the request gets here.

Each session's :class:`~engine.sources.webrtc.WebRtcSource` is handed to ``on_publish``, which
runs it (the live engine adds it as a stream); the session ends with its source.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import itertools
import logging
import re
from collections.abc import Callable, Sequence

from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpReceiver,
    RTCSessionDescription,
)

from engine.http import HttpReply, HttpRequest
from engine.sources.base import SourceState, SourceStateChange
from engine.sources.webrtc import WebRtcSource

log = logging.getLogger(__name__)

WHIP_PATH = "/whip"
SDP_TYPE = "application/sdp"
STREAM_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
NEGOTIATE_TIMEOUT_S = 8.0
"""Longest time to answer an offer (gathering included); under the server's open timeout."""

Publish = Callable[[WebRtcSource], None]
"""Takes a new session's source and runs it; called on the event loop, must not block."""


class WhipEndpoint:
    """The ``/whip`` resource of the event server.

    Args:
        on_publish: runs each new session's source (and adds its state listener).
        max_publishers: sessions at once; more get 503.
        ice_servers: STUN/TURN URLs; none by default (no lookups of public servers, which a
            closed network would wait on: host candidates serve a LAN and loopback).

    Loop affinity: the event server's loop.
    """

    def __init__(
        self,
        on_publish: Publish,
        *,
        max_publishers: int = 8,
        ice_servers: Sequence[str] = (),
    ) -> None:
        """See the class docstring."""
        self.on_publish = on_publish
        self.max_publishers = max_publishers
        self.ice_servers = list(ice_servers)
        self.sessions: dict[str, WebRtcSource] = {}
        self._numbers = itertools.count(1)
        self._pending: set[str] = set()

    async def handle(self, request: HttpRequest) -> HttpReply:
        """Answer one request to ``/whip`` or ``/whip/<id>``."""
        resource = request.path[len(WHIP_PATH) :].strip("/")
        if request.method == "OPTIONS":
            return HttpReply(
                http.HTTPStatus.NO_CONTENT,
                headers={"Accept-Post": SDP_TYPE, "Allow": "POST, DELETE, OPTIONS"},
            )
        if not resource and request.method == "POST":
            return await self._offer(request)
        if resource and request.method == "DELETE":
            return await self._delete(resource)
        if resource and request.method == "PATCH":
            return HttpReply.text(
                http.HTTPStatus.METHOD_NOT_ALLOWED, "trickle ICE is not supported"
            )
        allowed = "DELETE" if resource else "POST, OPTIONS"
        return HttpReply(
            http.HTTPStatus.METHOD_NOT_ALLOWED,
            b"method not allowed\n",
            headers={"Allow": allowed},
        )

    async def aclose(self) -> None:
        """End every session. Idempotent."""
        sessions = list(self.sessions.values())
        self.sessions.clear()
        for source in sessions:
            await source.stop("the server is shutting down")

    # --- POST: a new session -------------------------------------------------------------

    async def _offer(self, request: HttpRequest) -> HttpReply:
        content_type = request.headers.get("content-type", "").partition(";")[0].strip()
        if content_type.lower() != SDP_TYPE:
            return HttpReply.text(
                http.HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"send the offer as {SDP_TYPE}"
            )
        stream_id, refusal = self._claim(request.query.get("stream"))
        if refusal is not None:
            return refusal
        try:
            source, answer = await self._negotiate(stream_id, request.body)
        except ValueError as error:
            log.info("whip: %s: refused offer from %s: %s", stream_id, request.peer, error)
            return HttpReply.text(http.HTTPStatus.BAD_REQUEST, f"bad offer: {error}")
        finally:
            self._pending.discard(stream_id)
        self.sessions[stream_id] = source
        self.on_publish(source)
        log.info("whip: %s: publishing from %s", stream_id, request.peer)
        return HttpReply(
            http.HTTPStatus.CREATED,
            answer.encode("utf-8"),
            SDP_TYPE,
            headers={
                "Location": f"{WHIP_PATH}/{stream_id}",
                "X-Talkscope-Stream-Id": stream_id,
            },
        )

    def _claim(self, wanted: str | None) -> tuple[str, HttpReply | None]:
        if len(self.sessions) + len(self._pending) >= self.max_publishers:
            reply = HttpReply(
                http.HTTPStatus.SERVICE_UNAVAILABLE,
                f"{self.max_publishers} publishers already\n".encode(),
                headers={"Retry-After": "5"},
            )
            return "", reply
        if wanted is not None and not STREAM_ID.match(wanted):
            text = "stream ids are a letter then up to 63 letters, digits, '_' or '-'"
            return "", HttpReply.text(http.HTTPStatus.BAD_REQUEST, text)
        if wanted is not None and (wanted in self.sessions or wanted in self._pending):
            return "", HttpReply.text(http.HTTPStatus.CONFLICT, f"stream {wanted!r} is in use")
        stream_id = wanted or self._next_id()
        self._pending.add(stream_id)
        return stream_id, None

    def _next_id(self) -> str:
        while True:
            stream_id = f"web-{next(self._numbers)}"
            if stream_id not in self.sessions and stream_id not in self._pending:
                return stream_id

    async def _negotiate(self, stream_id: str, body: bytes) -> tuple[WebRtcSource, str]:
        """Answer the offer; the new session's source and the answer SDP.

        Raises:
            ValueError: the offer cannot be answered.
        """
        offer = _offer_text(body)
        servers = [RTCIceServer(urls=url) for url in self.ice_servers]
        pc = RTCPeerConnection(RTCConfiguration(iceServers=servers))
        tracks: list[tuple[MediaStreamTrack, RTCRtpReceiver]] = []

        def on_track(track: MediaStreamTrack) -> None:
            for transceiver in pc.getTransceivers():
                if transceiver.receiver.track is track:
                    tracks.append((track, transceiver.receiver))

        pc.on("track", on_track)
        try:
            async with asyncio.timeout(NEGOTIATE_TIMEOUT_S):
                await pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
                if not tracks:
                    raise ValueError("the offer sends no audio or video")
                await pc.setLocalDescription(await pc.createAnswer())
        except TimeoutError:
            await pc.close()
            raise ValueError("could not answer in time") from None
        except Exception as error:  # aiortc raises ValueError, KeyError, ... on bad SDP
            await pc.close()
            raise ValueError(str(error) or type(error).__name__) from error
        source = WebRtcSource(stream_id, pc, tracks, on_state=self._forget_when_done)
        return source, pc.localDescription.sdp

    def _forget_when_done(self, change: SourceStateChange) -> None:
        if change.state in (SourceState.ENDED, SourceState.FAILED):
            self.sessions.pop(change.stream_id, None)

    # --- DELETE: the end of a session ----------------------------------------------------

    async def _delete(self, stream_id: str) -> HttpReply:
        source = self.sessions.pop(stream_id, None)
        if source is None:
            return HttpReply.text(http.HTTPStatus.NOT_FOUND, f"no session {stream_id!r}")
        with contextlib.suppress(Exception):
            await source.stop("the publisher ended the session")
        return HttpReply.text(http.HTTPStatus.OK, f"session {stream_id} ended")


def _offer_text(body: bytes) -> str:
    """The offer as text, checked enough that aiortc's parser gets an SDP.

    Raises:
        ValueError: not UTF-8, or not an SDP session description.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("the offer is not UTF-8 text") from None
    if not text.startswith("v=0") or "\nm=" not in text:
        raise ValueError("the body is not an SDP offer (it must start with v=0 and have m= lines)")
    return text
