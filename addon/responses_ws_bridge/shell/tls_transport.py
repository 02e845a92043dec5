"""TLS for the upstream sockets, as a transport of our own over plain TCP.

asyncio's TLS transport gives every connection a 256 KiB read buffer,
written through at allocation and so resident even while the socket idles
between turns, and runs several Python layers for each chunk it reads. Here
the bytes TCP hands over go into `ssl`'s memory BIO and come out as
plaintext in the same callback: one `SSLObject.read` per TLS record, no
buffer of our own, and nothing left inside OpenSSL but a partial record (so
pausing the reading never strands plaintext that already arrived).

`TlsTransport` is both the TCP connection's protocol and, for the protocol
above it, its transport. TLS has no half-close: `can_write_eof` is False.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Any

# The plaintext of one TLS record is at most 16 KiB; `read` returns one record.
RECORD_SIZE = 16 * 1024


class TlsTransport(asyncio.Protocol, asyncio.Transport):
    def __init__(
        self, protocol: asyncio.BaseProtocol, context: ssl.SSLContext, server_hostname: str
    ) -> None:
        asyncio.Transport.__init__(self)
        self._protocol = protocol
        self._context = context
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._sslobj = context.wrap_bio(
            self._incoming, self._outgoing, server_side=False, server_hostname=server_hostname
        )
        self._tcp: asyncio.Transport | None = None
        # Resolved once TLS is up (the protocol above is connected then), or failed.
        self.handshake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._closing = False
        self._lost = False
        self._ended = False

    # -- the TCP side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._tcp = transport  # type: ignore[assignment]
        self._handshake_step()

    def data_received(self, data: bytes) -> None:
        self._incoming.write(data)
        if not self.handshake.done():
            self._handshake_step()
            if not self.handshake.done() or self.handshake.exception() is not None:
                return
        plain, end = self._read_plain()
        if plain and not self._lost:
            self._protocol.data_received(plain)  # type: ignore[attr-defined]
        if isinstance(end, ssl.SSLError):
            # A record that does not open: the connection is lost, with this as its reason.
            self._report_lost(end)
            self.abort()
        elif end and not self._closing:
            self._peer_ended()

    def eof_received(self) -> bool:
        if not self.handshake.done():
            self._fail_handshake(ConnectionResetError("connection closed during the TLS handshake"))
            return False
        # A TCP close without TLS's close_notify: still the end of the stream.
        self._peer_ended()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        if not self.handshake.done():
            lost = exc or ConnectionResetError("connection lost during the TLS handshake")
            self._fail_handshake(lost)
        self._report_lost(exc)

    def _report_lost(self, exc: Exception | None) -> None:
        # Only a protocol that was connected hears of the loss, and only once.
        if not self._lost and self.handshake.done() and self.handshake.exception() is None:
            self._lost = True
            self._protocol.connection_lost(exc)

    def pause_writing(self) -> None:
        self._protocol.pause_writing()

    def resume_writing(self) -> None:
        self._protocol.resume_writing()

    def _handshake_step(self) -> None:
        try:
            self._sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self._send_pending()
            return
        except ssl.SSLError as exc:
            self._send_pending()  # the alert, for the server's log
            self._fail_handshake(exc)
            return
        self._send_pending()
        self.handshake.set_result(None)
        self._protocol.connection_made(self)

    def _fail_handshake(self, exc: BaseException) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(exc)
            # Retrieved or not, the opener has its answer: no "never retrieved" warning.
            self.handshake.exception()
        self.abort()

    def _read_plain(self) -> tuple[bytes, bool | ssl.SSLError]:
        """Every byte of plaintext that arrived, and whether the peer closed TLS (or the
        error that broke it after that plaintext)."""
        sslobj, incoming = self._sslobj, self._incoming
        chunks: list[bytes] = []
        end: bool | ssl.SSLError = False
        while True:
            try:
                chunk = sslobj.read(RECORD_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                end = True
                break
            except ssl.SSLError as exc:
                end = exc
                break
            if not chunk:
                end = True
                break
            chunks.append(chunk)
            # Nothing left to decrypt: stop without paying for the WantRead exception.
            if not incoming.pending and not sslobj.pending():
                break
        self._send_pending()  # what reading produced (a key update's answer, an alert)
        return (chunks[0] if len(chunks) == 1 else b"".join(chunks)), end

    def _peer_ended(self) -> None:
        # close_notify and then TCP's own end: the protocol hears of the end once.
        if self._ended:
            return
        self._ended = True
        keep_open = self._protocol.eof_received()  # type: ignore[attr-defined]
        if not keep_open:
            self.close()

    def _send_pending(self) -> None:
        if self._outgoing.pending and self._tcp is not None and not self._tcp.is_closing():
            self._tcp.write(self._outgoing.read())

    # -- the transport of the protocol above

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing:
            return
        try:
            self._sslobj.write(data)
        except ssl.SSLError as exc:  # TLS broke (an alert came): the connection is lost
            self._report_lost(exc)
            self.abort()
            return
        self._send_pending()

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("TLS has no half-close")

    def close(self) -> None:
        """Sends TLS's close_notify, then closes TCP once what is buffered went out."""
        if self._closing:
            return
        self._closing = True
        if self.handshake.done() and self.handshake.exception() is None:
            # The peer's close_notify is not awaited: there is nothing more to read.
            with contextlib.suppress(ssl.SSLError, ValueError):
                self._sslobj.unwrap()
            self._send_pending()
        if self._tcp is not None:
            self._tcp.close()

    def abort(self) -> None:
        self._closing = True
        if self._tcp is not None:
            self._tcp.abort()

    def is_closing(self) -> bool:
        return self._closing or self._tcp is None or self._tcp.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._sslobj
        if name == "sslcontext":
            return self._context
        if name == "peercert":
            return self._sslobj.getpeercert()
        if name == "cipher":
            return self._sslobj.cipher()
        if self._tcp is None:
            return default
        return self._tcp.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def pause_reading(self) -> None:
        if self._tcp is not None:
            self._tcp.pause_reading()

    def resume_reading(self) -> None:
        if self._tcp is not None:
            self._tcp.resume_reading()

    def is_reading(self) -> bool:
        return self._tcp is not None and self._tcp.is_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._tcp is not None:
            self._tcp.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return 0 if self._tcp is None else self._tcp.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (0, 0) if self._tcp is None else self._tcp.get_write_buffer_limits()


async def open_connection(
    protocol: asyncio.BaseProtocol, host: str, port: int, context: ssl.SSLContext | None
) -> asyncio.Transport:
    """TCP to host:port, with TLS on it when `context` is given; `protocol` is connected
    once the connection is usable. Raises OSError, or ssl.SSLError for a failed handshake."""
    loop = asyncio.get_running_loop()
    if context is None:
        transport, _ = await loop.create_connection(lambda: protocol, host, port)
        return transport
    tls = TlsTransport(protocol, context, host)
    await loop.create_connection(lambda: tls, host, port)
    try:
        await tls.handshake
    except BaseException:
        tls.abort()
        raise
    return tls
