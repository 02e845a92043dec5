"""A hostile HTTP client for the hardening tests: raw sockets, no library politeness.

`raw_request` writes a request head and then as much of a body as the server
lets it, while reading what comes back, so a test can see whether the proxy
answered early, whether it closed the connection, and how much it swallowed.
The bodies are built in memory at small cost: `gzip_bomb` compresses zeros a
block at a time, `chunked_flood` yields chunked framing lazily.
"""

from __future__ import annotations

import socket
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

BLOCK = 64 * 1024


@dataclass
class RawResult:
    """What came back: the raw bytes until close (or the deadline), and what was sent."""

    received: bytes
    closed: bool
    body_bytes_sent: int

    @property
    def status(self) -> int | None:
        line = self.received.split(b"\r\n", 1)[0]
        parts = line.split()
        if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
            return int(parts[1])
        return None

    @property
    def head(self) -> bytes:
        return self.received.partition(b"\r\n\r\n")[0]

    @property
    def body(self) -> bytes:
        return self.received.partition(b"\r\n\r\n")[2]


def request_head(method: str, target: str, headers: Sequence[tuple[str, str | bytes]]) -> bytes:
    """A request head; values may be bytes, to send what a str could not say."""
    lines = [f"{method} {target} HTTP/1.1".encode()]
    for name, value in headers:
        raw = value if isinstance(value, bytes) else value.encode("latin-1")
        lines.append(name.encode("latin-1") + b": " + raw)
    return b"\r\n".join(lines) + b"\r\n\r\n"


def raw_request(
    port: int,
    head: bytes,
    body: Iterable[bytes] = (),
    *,
    timeout: float = 10.0,
    max_body: int | None = None,
    wait_for_answer_s: float = 0.0,
    close_within_s: float = 0.5,
) -> RawResult:
    """Sends `head`, then `body` pieces until the server stops taking them, and reads.

    `wait_for_answer_s`: first wait that long for an answer before sending any
    body, as a client that sent `Expect: 100-continue` does. Stops sending when
    the server closes or resets, or after `max_body` bytes. Bounded by
    `timeout` overall; once a whole answer with a length is in, it waits at most
    `close_within_s` more to see whether the server closes the connection.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head)
        talk = _Talk(sock, iter(body), max_body)
        if wait_for_answer_s > 0 and talk.first_answer(wait_for_answer_s):
            return talk.result()
        sock.setblocking(False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and talk.step():
            pass
        # Whatever is still buffered for us once the server closed; after a complete
        # answer, only whether the server closes (a keep-alive connection costs this).
        sock.setblocking(True)
        sock.settimeout(close_within_s)
        talk.read_until_closed()
        return talk.result()


class _Talk:
    """One raw exchange: what was received, whether the server closed, what was sent."""

    def __init__(self, sock: socket.socket, pieces: Iterator[bytes], max_body: int | None):
        self.sock = sock
        self.pieces = pieces
        self.max_body = max_body
        self.received = bytearray()
        self.closed = False
        self.sent = 0
        self.pending = b""
        self.sending = True

    def result(self) -> RawResult:
        return RawResult(bytes(self.received), self.closed, self.sent)

    def first_answer(self, wait_s: float) -> bool:
        """Waits for an answer before any body; True when the server closed meanwhile."""
        self.sock.settimeout(wait_s)
        try:
            first = self.sock.recv(BLOCK)
        except TimeoutError:
            return False
        self.received += first
        self.closed = not first
        return self.closed

    def step(self) -> bool:
        """Reads what came and sends a piece; False once the exchange is over."""
        try:
            data = self.sock.recv(BLOCK)
        except BlockingIOError:
            data = None
        except (ConnectionResetError, BrokenPipeError):
            self.closed = True
            return False
        if data is not None:
            if not data:
                self.closed = True
                return False
            self.received += data
            if _complete(self.received):
                return False
        if self.sending:
            self._send()
        else:
            time.sleep(0.005)
        return True

    def _send(self) -> None:
        if not self.pending:
            self.pending = next(self.pieces, b"")
            if not self.pending or (self.max_body is not None and self.sent >= self.max_body):
                self.sending = False
                return
        try:
            n = self.sock.send(self.pending)
        except BlockingIOError:
            time.sleep(0.001)
            return
        except (ConnectionResetError, BrokenPipeError):
            self.sending = False
            return
        self.sent += n
        self.pending = self.pending[n:]

    def read_until_closed(self) -> None:
        while not self.closed:
            try:
                data = self.sock.recv(BLOCK)
            except (ConnectionResetError, BrokenPipeError):
                self.closed = True
                return
            except OSError:  # the timeout: still open
                return
            if not data:
                self.closed = True
                return
            self.received += data


def _complete(received: bytes | bytearray) -> bool:
    """A whole response with a Content-Length has arrived (then there is no need to wait)."""
    head, sep, body = bytes(received).partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            return len(body) >= int(value.strip())
    return False


def endless(block: bytes = b"x" * BLOCK) -> Iterator[bytes]:
    """The same block forever: a Content-Length body that never ends."""
    while True:
        yield block


def chunked_flood(total: int | None = None, size: int = BLOCK) -> Iterator[bytes]:
    """Chunked framing of `total` bytes (None: forever), then the last chunk if it ends."""
    piece = b"%x\r\n%s\r\n" % (size, b"y" * size)
    sent = 0
    while total is None or sent + size <= total:
        yield piece
        sent += size
    if total is not None:
        if total > sent:
            rest = total - sent
            yield b"%x\r\n%s\r\n" % (rest, b"y" * rest)
        yield b"0\r\n\r\n"


def gzip_bomb(decoded_size: int, *, wbits: int = 16 + zlib.MAX_WBITS) -> bytes:
    """`decoded_size` zero bytes, gzip-compressed (raw deflate or zlib with other wbits)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, wbits)
    zeros = bytes(1024 * 1024)
    parts: list[bytes] = []
    left = decoded_size
    while left > 0:
        take = min(left, len(zeros))
        parts.append(compressor.compress(zeros[:take]))
        left -= take
    parts.append(compressor.flush())
    return b"".join(parts)


# Header sets a bridged request must be refused for, before any upstream turn.
BAD_HEADERS: dict[str, list[tuple[str, str | bytes]]] = {
    "non_ascii_request_id": [("x-request-id", "req-\u00e9".encode())],
    "transfer_encoding_gzip_chunked": [("transfer-encoding", "gzip, chunked")],
    "headers_over_16_kib": [("x-padding", "p" * (17 * 1024))],
    "control_char_in_session_id": [("session_id", b"sess\x01ion")],
    "non_latin1_in_session_id": [("session-id", "\u65e5\u672c".encode())],
}
