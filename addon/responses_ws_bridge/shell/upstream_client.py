"""Upstream Responses WebSocket connections, over `websockets`' sans-I/O client protocol.

A thin I/O layer: it opens a connection with the headers it is given, sends
`response.create` frames, and hands back received frames in batches (all the
frames that had already arrived, so the relay can write them in one go). Every
step is reported to an optional `SessionTap`, which is how sessions get recorded
as mitmproxy flows. No policy lives here. The bytes, timers and backpressure
of one connection are `ws_connection.WebSocketConnection`'s.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from websockets.client import ClientProtocol
from websockets.exceptions import (
    ConnectionClosed,
    InvalidHandshake,
    InvalidStatus,
    InvalidURI,
)
from websockets.extensions.permessage_deflate import enable_client_permessage_deflate
from websockets.frames import Close, CloseCode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.uri import parse_uri

from responses_ws_bridge.core.failures import (
    AttemptFailed,
    ConnectFailed,
    ConnectionLost,
    Failure,
    UpstreamClosed,
)
from responses_ws_bridge.core.retry_policy import handshake_rejected
from responses_ws_bridge.core.turns import Attempt, Turn
from responses_ws_bridge.shell.tls_transport import open_connection
from responses_ws_bridge.shell.ws_connection import WebSocketConnection

# mitmproxy turns the root logger up to DEBUG, and websockets' protocol then
# logs every frame, each log line running through mitmproxy's addon hooks: the
# upstream connections get a logger of their own that stays at INFO.
_WS_LOGGER = logging.getLogger("responses_bridge.upstream")
_WS_LOGGER.setLevel(logging.INFO)


@dataclass(frozen=True)
class UpstreamSettings:
    connect_timeout: float = 10.0
    max_message_size: int | None = 32 * 1024 * 1024
    ping_interval: float | None = 20.0
    ping_timeout: float | None = 20.0
    compression: bool = False
    close_timeout: float = 5.0
    # How `wss://` upstreams are verified, as mitmproxy verifies its own upstreams:
    # `ssl_verify_upstream_trusted_ca` (a PEM bundle) and
    # `ssl_verify_upstream_trusted_confdir` (a directory of hashed certificates)
    # replace the default trust store; `ssl_insecure` turns verification off.
    trusted_ca: str | None = None
    trusted_ca_dir: str | None = None
    insecure: bool = False


def tls_context(settings: UpstreamSettings) -> ssl.SSLContext | None:
    """The client context for `wss://` (None: the library's default, the system's CAs).

    Raises OSError or ssl.SSLError when a trusted CA cannot be loaded.
    """
    if settings.trusted_ca is None and settings.trusted_ca_dir is None and not settings.insecure:
        return None
    return _tls_context(settings.trusted_ca, settings.trusted_ca_dir, settings.insecure)


@functools.lru_cache(maxsize=8)
def _tls_context(cafile: str | None, capath: str | None, insecure: bool) -> ssl.SSLContext:
    # One context per configuration: loading a CA bundle costs milliseconds per connection.
    # With a CA file or directory given, the system's CAs are not loaded at all.
    context = ssl.create_default_context(cafile=cafile, capath=capath)
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class SessionTap(Protocol):
    """Observes one upstream connection (implemented by the flow recorder)."""

    def attach(self, turn: Turn, attempt: Attempt) -> None:
        """A reused connection starts serving another request."""

    def idle(self) -> None:
        """The turn is over; the connection waits, open, for its next one."""

    def handshake_done(
        self, request: Request | None, response: Response | None, error: str | None
    ) -> None: ...

    def message(self, from_client: bool, data: str | bytes, timestamp: float) -> None: ...

    def closed(
        self, code: int | None, reason: str, closed_by_client: bool, timestamp: float
    ) -> None: ...


class UpstreamSession:
    """One open upstream WebSocket connection; may serve several turns in a row."""

    def __init__(self, ws: WebSocketConnection, url: str, tap: SessionTap | None) -> None:
        self._ws = ws
        self.url = url
        self.tap = tap
        self.opened_at = time.monotonic()
        self.last_used = self.opened_at
        self.turns = 0
        self._closed_reported = False

    @property
    def response_headers(self) -> list[tuple[str, str]]:
        response = self._ws.response
        return list(response.headers.raw_items()) if response is not None else []

    @property
    def handshake(self) -> tuple[Request | None, Response | None]:
        """The upgrade request as sent and the 101 as received."""
        return self._ws.request, self._ws.response

    def adopt(self, tap: SessionTap | None) -> None:
        """A session opened without a tap (a warm spare) starts being recorded."""
        self.tap = tap
        if tap is not None:
            request, response = self.handshake
            tap.handshake_done(request, response, None)

    @property
    def local_address(self) -> tuple[str, int] | None:
        address = self._ws.transport.get_extra_info("sockname")
        return (str(address[0]), int(address[1])) if address else None

    @property
    def is_open(self) -> bool:
        return self._ws.protocol.state is State.OPEN

    async def send(self, message: str | bytes) -> None:
        """Sends one text frame (bytes are taken as UTF-8 text, not binary)."""
        self.last_used = time.monotonic()
        try:
            await self._ws.send_text(message)
        except ConnectionClosed as exc:
            raise self._closed(exc) from exc
        if self.tap is not None:
            self.tap.message(True, message, time.time())

    async def next_batch(self, timeout: float | None = None) -> list[str | bytes]:
        """Waits for the next frame; returns it with every frame already received.

        Text frames come as str, binary frames as bytes: the relay refuses
        those, which it could not do once they were decoded. Raises
        TimeoutError when `timeout` seconds passed without a frame.
        """
        try:
            batch = await self._ws.receive_batch(timeout)
        except ConnectionClosed as exc:
            raise self._closed(exc) from exc
        if not batch:
            raise TimeoutError
        return self._received(batch)

    def ready(self) -> list[str | bytes]:
        """The frames received by now, without waiting ([] for none); raises
        `AttemptFailed` once none is left and the connection is closed."""
        try:
            batch = self._ws.take_ready()
        except ConnectionClosed as exc:
            raise self._closed(exc) from exc
        return self._received(batch) if batch else batch

    def listen(self, listener: Callable[[], None] | None) -> None:
        """`listener` runs in the data callback when frames arrive or the socket closes."""
        self._ws.listen(listener)

    def _received(self, batch: list[str | bytes]) -> list[str | bytes]:
        now = time.time()
        self.last_used = time.monotonic()
        if self.tap is not None:
            for message in batch:
                self.tap.message(False, message, now)
        return batch

    def idle(self) -> None:
        """The turn is over and the session waits for the next (told to the tap)."""
        if self.tap is not None:
            self.tap.idle()

    async def close(self, code: int = CloseCode.NORMAL_CLOSURE, reason: str = "") -> None:
        try:
            await self._ws.close(code, reason)
        finally:
            self._report_close()

    def abort(self) -> None:
        """Drops the connection without a closing handshake (used on shutdown)."""
        self._ws.abort()
        self._report_close()

    def _closed(self, exc: ConnectionClosed) -> AttemptFailed:
        self._report_close()
        by_bridge = _closed_by_client(exc.rcvd, exc.sent, exc.rcvd_then_sent)
        frame = exc.rcvd if exc.rcvd is not None else exc.sent
        failure: Failure
        if frame is None:
            failure = ConnectionLost()
        else:
            failure = UpstreamClosed(frame.code, frame.reason, by_bridge=by_bridge)
        return AttemptFailed(failure)

    def _report_close(self) -> None:
        if self._closed_reported or self.tap is None:
            return
        protocol = self._ws.protocol
        if protocol.state is not State.CLOSED and protocol.close_rcvd is None:
            # Not closed yet (close() is still in progress): report on completion.
            self._ws.lost.add_done_callback(lambda _: self._report_close())
            return
        self._closed_reported = True
        rcvd, sent = protocol.close_rcvd, protocol.close_sent
        frame = rcvd if rcvd is not None else sent
        code = frame.code if frame is not None else None
        reason = frame.reason if frame is not None else ""
        by_client = _closed_by_client(rcvd, sent, protocol.close_rcvd_then_sent)
        self.tap.closed(code, reason, by_client, time.time())


def _closed_by_client(rcvd: Close | None, sent: Close | None, rcvd_then_sent: bool | None) -> bool:
    """Whether this side (the bridge, the WebSocket client) started the closing."""
    if sent is None:
        return False
    return rcvd is None or rcvd_then_sent is False


async def open_session(
    url: str,
    headers: Sequence[tuple[str, str]],
    settings: UpstreamSettings,
    *,
    tap: SessionTap | None = None,
    ssl_context: ssl.SSLContext | None = None,
    transport: asyncio.Transport | None = None,
) -> UpstreamSession:
    """Opens an upstream connection; raises `AttemptFailed` when it cannot.

    `headers` go out as given, the client's own User-Agent among them when it
    sent one; never through a proxy (the bridge is the proxy). The connect
    timeout covers TCP, TLS and the upgrade. `transport`: a connection to the
    URL's host made ahead (`preconnect`), on which the upgrade is sent.
    """
    ws: WebSocketConnection | None = None
    try:
        uri = parse_uri(url)
        context = _context_for(uri.secure, settings, ssl_context)
        protocol = ClientProtocol(
            uri,
            extensions=enable_client_permessage_deflate(None) if settings.compression else None,
            max_size=settings.max_message_size,
            logger=_WS_LOGGER,
        )
        ws = WebSocketConnection(
            protocol,
            ping_interval=settings.ping_interval,
            ping_timeout=settings.ping_timeout,
            close_timeout=settings.close_timeout,
        )
        async with asyncio.timeout(settings.connect_timeout):
            await ws.connect(uri, headers, context, transport=transport)
    except BaseException as exc:
        if ws is not None:
            ws.abort()
        failure = _open_failure(exc, url, settings)
        if failure is None:
            raise
        if tap is not None:
            request = ws.request if ws is not None else None
            response = exc.response if isinstance(exc, InvalidStatus) else None
            error = failure.detail if isinstance(failure, ConnectFailed) else None
            tap.handshake_done(request, response, error)
        raise AttemptFailed(failure) from exc
    if tap is not None:
        tap.handshake_done(ws.request, ws.response, None)
    return UpstreamSession(ws, url, tap)


def client_tls_context(secure: bool, settings: UpstreamSettings) -> ssl.SSLContext | None:
    """The TLS context of any upstream connection the bridge makes (None: cleartext)."""
    return _context_for(secure, settings)


def _context_for(
    secure: bool, settings: UpstreamSettings, given: ssl.SSLContext | None = None
) -> ssl.SSLContext | None:
    if not secure:
        return None
    context = given if given is not None else tls_context(settings)
    # None: the system's CAs, as asyncio's default, but loaded once.
    return context if context is not None else _tls_context(None, None, False)


class _Parked(asyncio.Protocol):
    """Holds a connection made ahead until a request sends its upgrade on it.

    Nothing is sent on it, so the upstream has nothing to say: anything it
    sends (or its closing) makes the connection useless, and it is closed.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.dead = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._die()

    def eof_received(self) -> bool:
        self._die()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.dead = True

    def _die(self) -> None:
        self.dead = True
        if self.transport is not None:
            self.transport.close()


@dataclass
class Preconnected:
    """A connection to an upstream host with TCP (and TLS) done and nothing sent."""

    parked: _Parked
    made_at: float

    @property
    def usable(self) -> bool:
        transport = self.parked.transport
        return not self.parked.dead and transport is not None and not transport.is_closing()

    def take(self) -> asyncio.Transport:
        transport = self.parked.transport
        assert transport is not None
        return transport

    def close(self) -> None:
        if self.parked.transport is not None:
            self.parked.transport.close()


async def preconnect(url: str, settings: UpstreamSettings) -> Preconnected:
    """A TCP (and TLS) connection to the host of `url`, made ahead of any request.

    It carries no request, header or credential: those go out only on the
    upgrade a request sends on it. Raises OSError, ssl.SSLError or TimeoutError.
    """
    uri = parse_uri(url)
    context = _context_for(uri.secure, settings)
    parked = _Parked()
    async with asyncio.timeout(settings.connect_timeout):
        await open_connection(parked, uri.host, uri.port, context)
    return Preconnected(parked, asyncio.get_running_loop().time())


def _open_failure(exc: BaseException, url: str, settings: UpstreamSettings) -> Failure | None:
    """What a failed open means; None for what is not an upstream's doing (cancellation)."""
    if isinstance(exc, InvalidStatus):
        response = exc.response
        return handshake_rejected(
            response.status_code,
            response.headers.raw_items(),
            bytes(response.body or b""),
            wall_now=time.time(),
        )
    # Before OSError: TimeoutError is one.
    if isinstance(exc, TimeoutError):
        detail = f"timed out after {settings.connect_timeout:g} s opening {url}"
        return ConnectFailed(detail, timed_out=True)
    if isinstance(exc, OSError | InvalidHandshake | InvalidURI | ssl.SSLError):
        return ConnectFailed(f"cannot open {url}: {exc or type(exc).__name__}")
    return None
