"""An HTTP/2 client over TLS through a proxy's CONNECT, with its flow control in the test's hands.

It reads every frame off the socket as soon as it arrives, so the proxy's
socket writes never wait, but opens its receive window only when told
(`took`): the proxy may send a stream no more than the window the client
allowed, and must hold (or not produce) the rest. `h2` (a mitmproxy
dependency) does the framing; every read is bounded by the caller's deadline.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable

import h2.config
import h2.connection
import h2.events

READ = 65536


class H2Client:
    def __init__(self, proxy_port: int, host: str, port: int, cafile: str) -> None:
        raw = socket.create_connection(("127.0.0.1", proxy_port), timeout=10)
        raw.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = raw.recv(READ)
            assert chunk, f"the proxy closed the CONNECT: {head!r}"
            head += chunk
        assert head.split(b"\r\n", 1)[0].split()[1] == b"200", head
        context = ssl.create_default_context(cafile=cafile)
        context.set_alpn_protocols(["h2"])
        self.sock = context.wrap_socket(raw, server_hostname=host)
        assert self.sock.selected_alpn_protocol() == "h2"
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.authority = f"{host}:{port}"
        self.status: dict[int, int] = {}
        self.body: dict[int, bytearray] = {}
        self.ended: set[int] = set()
        self.reset: set[int] = set()
        self.closed = False
        self._unacknowledged: dict[int, int] = {}
        self._flush()

    def post(self, path: str, body: bytes, headers: list[tuple[str, str]]) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        self.conn.send_headers(
            stream_id,
            [
                (":method", "POST"),
                (":scheme", "https"),
                (":authority", self.authority),
                (":path", path),
                ("content-length", str(len(body))),
                *headers,
            ],
        )
        self.conn.send_data(stream_id, body, end_stream=True)
        self.body[stream_id] = bytearray()
        self._flush()
        return stream_id

    def pump(self, until: Callable[[], bool], deadline: float) -> bool:
        """Reads frames until `until()` holds, the connection ends or the deadline passes."""
        while not until() and not self.closed:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.sock.settimeout(min(left, 0.2))
            try:
                data = self.sock.recv(READ)
            except TimeoutError:
                continue
            if not data:
                self.closed = True
                break
            for event in self.conn.receive_data(data):
                self._on(event)
            self._flush()
        return until()

    def took(self, stream_id: int) -> bool:
        """The application read what arrived: the window opens by as much (WINDOW_UPDATE).

        True, to read on in `pump(lambda: h2.took(stream) and ...)`.
        """
        size = self._unacknowledged.pop(stream_id, 0)
        if size and not self.closed:
            self.conn.acknowledge_received_data(size, stream_id)
            self._flush()
        return True

    def cancel(self, stream_id: int) -> None:
        self.conn.reset_stream(stream_id)
        self._flush()

    def close(self) -> None:
        self.sock.close()

    def _on(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            assert event.stream_id is not None and event.headers is not None
            status = dict(event.headers)[b":status"]
            self.status[event.stream_id] = int(status)
        elif isinstance(event, h2.events.DataReceived):
            assert event.stream_id is not None and event.data is not None
            self.body[event.stream_id] += event.data
            size = event.flow_controlled_length or 0
            self._unacknowledged[event.stream_id] = (
                self._unacknowledged.get(event.stream_id, 0) + size
            )
        elif isinstance(event, h2.events.StreamEnded):
            assert event.stream_id is not None
            self.ended.add(event.stream_id)
        elif isinstance(event, h2.events.StreamReset):
            assert event.stream_id is not None
            self.reset.add(event.stream_id)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.closed = True

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)
