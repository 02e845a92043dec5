"""One WebSocket client connection: `websockets`' sans-I/O `ClientProtocol` under asyncio callbacks.

`data_received` feeds the protocol and appends the messages it yields to a
deque; a reader waits on one future, resolved only while it waits, and takes
every queued message at once. No task runs per connection or per frame:
keepalive pings and the closing deadline are `loop.call_later` timers.

Backpressure both ways: reading pauses once more than `high_water` bytes of
messages wait for the reader and resumes when it takes them (it takes all of
them, so there is no separate low-water mark); `send_text` waits while the
transport has paused writing.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import deque
from collections.abc import Callable, Sequence
from ssl import SSLContext
from typing import cast

from websockets.client import ClientProtocol
from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.typing import BytesLike
from websockets.uri import WebSocketURI

from responses_ws_bridge.shell.tls_transport import open_connection

# Bytes of received messages waiting for the reader, above which reading pauses.
HIGH_WATER = 1024 * 1024

KEEPALIVE_TIMEOUT_REASON = "keepalive ping timeout"


class WebSocketConnection(asyncio.Protocol):
    """The asyncio side of one client WebSocket: moves bytes, keeps time, holds messages."""

    def __init__(
        self,
        protocol: ClientProtocol,
        *,
        ping_interval: float | None,
        ping_timeout: float | None,
        close_timeout: float,
        high_water: int = HIGH_WATER,
    ) -> None:
        self.protocol = protocol
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.close_timeout = close_timeout
        self.high_water = high_water
        self.loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self.request: Request | None = None
        self.response: Response | None = None
        # Resolved once the upgrade has its answer, or cannot get one.
        self.opened: asyncio.Future[None] = self.loop.create_future()
        # Resolved by connection_lost; the protocol's state is CLOSED from then on.
        self.lost: asyncio.Future[None] = self.loop.create_future()
        self._messages: deque[str | bytes] = deque()
        # Payload bytes of the messages in _messages: what the high-water mark bounds.
        self.buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        # Called at once, in place of waking a reader, while a consumer listens.
        self._listener: Callable[[], None] | None = None
        self._fragments: list[BytesLike] = []
        # Frames are read here once open (see `_read_frames`). The bytes of an unfinished
        # frame, in the pieces they came in, and how many make it whole (0: its header is
        # not whole yet): joined once, when complete, not at every piece.
        self._framing = False
        self._partial: list[bytes] = []
        self._partial_size = 0
        self._partial_need = 0
        self._head_tail = b""
        limits = [
            x for x in (protocol.max_message_size, protocol.max_fragment_size) if x is not None
        ]
        self._frame_limit = min(limits) if limits else None
        self._fragmented_text = False
        # Set once the bridge closes or fails the connection: later messages are dropped.
        self._discarding = False
        self._reading_paused = False
        self._writing_paused = False
        self._drained: asyncio.Future[None] | None = None
        self._ping_payload: bytes | None = None
        self._ping_sent_at = 0.0
        self._ping_timer: asyncio.TimerHandle | None = None
        self._pong_timer: asyncio.TimerHandle | None = None
        self._close_timer: asyncio.TimerHandle | None = None

    # -- opening

    async def connect(
        self,
        uri: WebSocketURI,
        headers: Sequence[tuple[str, str]],
        ssl: SSLContext | None = None,
        *,
        transport: asyncio.Transport | None = None,
    ) -> None:
        """Opens TCP (and TLS), sends the upgrade with `headers` added, awaits the answer.

        `transport`: a connection made ahead (TCP and TLS done, nothing sent),
        on which the upgrade goes out instead of on a new one. Raises OSError
        or ssl.SSLError when no connection is made, and the protocol's
        `handshake_exc` (`InvalidStatus` for a rejection) when the upgrade
        fails. The caller bounds the time and aborts on failure.
        """
        if transport is not None:
            transport.set_protocol(self)
            self.connection_made(transport)
        else:
            await open_connection(self, uri.host, uri.port, ssl)
        request = self.protocol.connect()
        request.headers.update(headers)
        self.send_request(request)
        await self.opened
        if self.protocol.handshake_exc is not None:
            raise self.protocol.handshake_exc

    def send_request(self, request: Request) -> None:
        self.request = request
        self.protocol.send_request(request)
        self._flush()

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    @property
    def transport(self) -> asyncio.Transport:
        """The connection's transport; only once connected."""
        if self._transport is None:
            raise RuntimeError("not connected")
        return self._transport

    def data_received(self, data: bytes) -> None:
        if self._framing and self.protocol.state is State.OPEN:
            queued = self._read_frames(data)
        else:
            queued = self._feed_protocol(data)
        if queued:
            if self.buffered > self.high_water and not self._reading_paused:
                self._reading_paused = True
                self.transport.pause_reading()
            self._wake_reader()

    def _feed_protocol(self, data: bytes) -> bool:
        """Hands bytes to `websockets`' own parser; True when a message completed.

        During the handshake only the answer's head goes in first: after a 101
        the bytes that follow start at a frame's boundary, and from there the
        frames are read here (`_read_frames`)."""
        if self._framing:  # the connection is closing: websockets reads what is left
            self._framing = False
            data = self._take_partial() + data
        rest = b""
        if not self.opened.done():
            data, rest = self._split_head(data)
        queued = self._protocol_events(data)
        if not self.opened.done():
            self._settle_handshake()
        if rest:
            more = self._read_frames(rest) if self._framing else self._protocol_events(rest)
            queued = more or queued
            if not self.opened.done():
                self._settle_handshake()  # a rejection, once its body is in
        return queued

    def _split_head(self, data: bytes) -> tuple[bytes, bytes]:
        """`data` up to the end of the handshake answer's head, and what follows it."""
        probe = self._head_tail + data
        end = probe.find(b"\r\n\r\n")
        if end < 0:
            self._head_tail = probe[-3:]
            return data, b""
        cut = end + 4 - len(self._head_tail)
        return data[:cut], data[cut:]

    def _protocol_events(self, data: bytes) -> bool:
        protocol = self.protocol
        protocol.receive_data(data)
        events = protocol.events_received()
        self._flush()  # pongs, the echo of a close frame
        queued = False
        for event in events:
            if isinstance(event, Frame):
                queued = self._frame(event) or queued
            elif isinstance(event, Response):
                self.response = event
        return queued

    def _read_frames(self, data: bytes) -> bool:
        """Reads frames; a whole, unfragmented text or binary message is taken here,
        every other frame goes to `websockets` whole, at a frame boundary, so its
        state (pings, closes, fragments, limits) stays its own."""
        if self._partial:
            self._partial.append(data)
            self._partial_size += len(data)
            if self._partial_size < self._partial_need:
                return False
            data = self._take_partial()
        buf = data
        view = memoryview(buf)
        size, pos, queued, need = len(buf), 0, False, 0
        limit = self._frame_limit
        while size - pos >= 2:
            head, second = buf[pos], buf[pos + 1]
            start, length = pos + 2, second & 0x7F
            if length >= 126:
                wide = 2 if length == 126 else 8
                if size - start < wide:
                    break
                length = int.from_bytes(buf[start : start + wide])
                start += wide
            end = start + length
            if second & 0x80 or (limit is not None and length > limit):
                # Masked, or over the limit: websockets fails the connection its way.
                return self._feed_protocol(buf[pos:]) or queued
            if end > size:
                need = end - pos
                break
            if (head == 0x81 or head == 0x82) and not self._fragments:
                queued = self._message(view[start:end], head == 0x81) or queued
            else:
                queued = self._protocol_events(buf[pos:end]) or queued
            pos = end
            if self.protocol.state is not State.OPEN:
                return self._feed_protocol(buf[pos:]) or queued
        if pos < size:
            rest = buf[pos:] if pos else buf
            self._partial, self._partial_size, self._partial_need = [rest], len(rest), need
        return queued

    def _take_partial(self) -> bytes:
        pieces = self._partial
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        self._partial, self._partial_size, self._partial_need = [], 0, 0
        return data

    def eof_received(self) -> None:
        # A rejection without Content-Length ends at EOF, its only event then.
        self._receive_eof()
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._receive_eof()  # idempotent; the state is CLOSED after it
        self.protocol.data_to_send()  # nowhere to go any more
        for timer in (self._ping_timer, self._pong_timer, self._close_timer):
            if timer is not None:
                timer.cancel()
        self._ping_timer = self._pong_timer = self._close_timer = None
        if not self.lost.done():
            self.lost.set_result(None)
        self.resume_writing()
        self._wake_reader()

    def _receive_eof(self) -> None:
        if self._framing:
            # An unfinished frame is websockets' to judge (an unexpected end of stream).
            self._framing = False
            if self._partial:
                self._protocol_events(self._take_partial())
        self.protocol.receive_eof()
        for event in self.protocol.events_received():
            if isinstance(event, Response):
                self.response = event
        self._settle_handshake()

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # -- receiving

    def _frame(self, frame: Frame) -> bool:
        """Handles one frame; True when it completed a message."""
        opcode = frame.opcode
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            if frame.fin:
                return self._message(frame.data, opcode is Opcode.TEXT)
            self._fragments = [frame.data]
            self._fragmented_text = opcode is Opcode.TEXT
        elif opcode is Opcode.CONT:
            self._fragments.append(frame.data)
            if frame.fin:
                data = b"".join(self._fragments)
                self._fragments = []
                return self._message(data, self._fragmented_text)
        elif opcode is Opcode.PONG:
            self._pong(bytes(frame.data))
        # The protocol answers pings itself; a close frame changes its state.
        return False

    def _message(self, data: BytesLike, text: bool) -> bool:
        if self._discarding:
            return False
        message: str | bytes
        if text:
            try:
                message = str(data, "utf-8")
            except UnicodeDecodeError as exc:
                # What websockets' own asyncio client does with such a frame.
                self.fail(CloseCode.INVALID_DATA, f"{exc.reason} at position {exc.start}")
                return False
        else:
            message = bytes(data)
        self._messages.append(message)
        # Fragments of an unfinished message are not counted (max_size bounds
        # them): pausing for them would wait for a reader that cannot take them.
        self.buffered += len(data)
        return True

    def _wake_reader(self) -> None:
        if self._listener is not None:
            self._listener()
            return
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def listen(self, listener: Callable[[], None] | None) -> None:
        """`listener` is called, from the data callback, whenever messages arrive or the
        connection closes (None: stop); it takes them with `take_ready`. No reader
        task wakes up per message."""
        self._listener = listener

    def take_ready(self) -> list[str | bytes]:
        """Every message queued now ([] for none); raises `ConnectionClosed` once none is
        left and the connection is closed."""
        if not self._messages:
            if self.protocol.state is State.CLOSED:
                raise self.protocol.close_exc
            return []
        return self._take_all()

    async def receive_batch(self, timeout: float | None = None) -> list[str | bytes]:
        """Waits for a message; returns it and every one queued behind it.

        Returns [] when `timeout` seconds passed without one (None: no limit);
        messages already queued are returned at once, with no timer at all.
        Raises `ConnectionClosed` once none is left and the connection is closed.
        """
        deadline = None if timeout is None else self.loop.time() + timeout
        while not self._messages:
            if self.protocol.state is State.CLOSED:
                raise self.protocol.close_exc
            if deadline is not None and self.loop.time() >= deadline:
                return []
            await self._wait(deadline)
        return self._take_all()

    def _take_all(self) -> list[str | bytes]:
        """The queued messages, all of them: reading goes on if it paused for them."""
        batch = list(self._messages)
        self._messages.clear()
        self.buffered = 0
        if self._reading_paused:
            self._resume_reading()
        return batch

    async def _wait(self, deadline: float | None) -> None:
        """Until a message (or the close) arrives, or the deadline passes."""
        if self._waiter is not None:
            raise RuntimeError("another reader is waiting on this connection")
        self._waiter = self.loop.create_future()
        # A timer, not asyncio.timeout: no task cancellation, nothing per batch that had messages.
        timer = None if deadline is None else self.loop.call_at(deadline, self._wake_reader)
        try:
            await self._waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    def _resume_reading(self) -> None:
        self._reading_paused = False
        if self._transport is not None:
            self._transport.resume_reading()

    # -- sending

    async def send_text(self, message: str | bytes) -> None:
        """Sends one text frame; raises `ConnectionClosed` when the connection is not open."""
        if self.protocol.state is not State.OPEN:
            await self.wait_closed()
            raise self.protocol.close_exc
        self.protocol.send_text(message.encode() if isinstance(message, str) else message)
        self._flush()
        if self._writing_paused:
            if self._drained is None or self._drained.done():
                self._drained = self.loop.create_future()
            # Shielded: a cancelled sender must not cancel what another sender awaits.
            await asyncio.shield(self._drained)

    def _flush(self) -> None:
        transport = self._transport
        if transport is None:
            return
        for data in self.protocol.data_to_send():
            if data:
                transport.write(data)
            elif transport.can_write_eof():
                with contextlib.suppress(OSError, RuntimeError):
                    transport.write_eof()
            else:
                transport.close()  # TLS cannot half-close
        if self._close_timer is None and self.protocol.close_expected():
            self._arm_close_timer()

    # -- closing

    async def close(self, code: int = CloseCode.NORMAL_CLOSURE, reason: str = "") -> None:
        """The closing handshake: waits for the TCP close, aborting after `close_timeout`.

        Messages not read yet are dropped: whoever closes is done reading.
        """
        if self._transport is None:
            return  # never connected: nothing to close, and `lost` would never resolve
        self._messages.clear()
        self.buffered = 0
        self._discard_messages()
        if self.protocol.state is State.OPEN:
            self.protocol.send_close(code, reason)
            self._flush()
        self._arm_close_timer()
        await self.wait_closed()

    def fail(self, code: int, reason: str) -> None:
        """Sends a close frame and takes no more messages (RFC 6455 7.1.7); the peer closes TCP.

        Messages queued before stay for the reader.
        """
        self.protocol.fail(code, reason)
        self._flush()
        self._discard_messages()

    def _discard_messages(self) -> None:
        self._discarding = True
        # What arrives now is dropped: reading again lets the peer's close frame and EOF in.
        if self._reading_paused:
            self._resume_reading()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    async def wait_closed(self) -> None:
        await asyncio.shield(self.lost)

    def _arm_close_timer(self) -> None:
        if self._close_timer is None and self._transport is not None and not self.lost.done():
            self._close_timer = self.loop.call_later(self.close_timeout, self._close_timed_out)

    def _close_timed_out(self) -> None:
        self._close_timer = None
        self.abort()

    def _settle_handshake(self) -> None:
        if self.opened.done():
            return
        if self.protocol.state is State.OPEN:
            self.opened.set_result(None)
            # Extensions (compression) change what a frame holds: websockets reads those.
            self._framing = not self.protocol.extensions
            self._schedule_ping(self.ping_interval)
        elif self.protocol.handshake_exc is not None or self.protocol.state is State.CLOSED:
            self.opened.set_result(None)

    # -- keepalive

    def _schedule_ping(self, delay: float | None) -> None:
        if delay is not None:
            self._ping_timer = self.loop.call_later(max(delay, 0.0), self._ping)

    def _ping(self) -> None:
        self._ping_timer = None
        if self.protocol.state is not State.OPEN:
            return
        payload = random.randbytes(4)
        self._ping_payload = payload
        self._ping_sent_at = self.loop.time()
        self.protocol.send_ping(payload)
        self._flush()
        if self.ping_timeout is None:
            self._schedule_ping(self.ping_interval)
        else:
            self._pong_timer = self.loop.call_later(self.ping_timeout, self._pong_missing)

    def _pong(self, payload: bytes) -> None:
        if self._pong_timer is None or payload != self._ping_payload:
            return  # unsolicited, or no deadline to lift
        self._pong_timer.cancel()
        self._pong_timer = None
        self._ping_payload = None
        # The next ping goes `ping_interval` after this one was sent.
        elapsed = self.loop.time() - self._ping_sent_at
        self._schedule_ping(None if self.ping_interval is None else self.ping_interval - elapsed)

    def _pong_missing(self) -> None:
        self._pong_timer = None
        if self.protocol.state is State.OPEN:
            self.fail(CloseCode.INTERNAL_ERROR, KEEPALIVE_TIMEOUT_REASON)
