"""One JSON `POST` to the OAuth token endpoint, finished or abandoned within one deadline.

A total deadline, not a per-read timeout: an endpoint that drips a byte every
few seconds, or accepts the connection and never answers, costs at most
`deadline_s`, and nothing is left behind (no thread, no socket). HTTP/1.1 with
`h11` over asyncio streams; TLS verified with the system's trust store; never
through an environment proxy; the answer is read up to 1 MiB.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from urllib.parse import urlsplit

import h11

MAX_ANSWER_BYTES = 1024 * 1024
DEFAULT_DEADLINE_S = 20.0


class AnswerTooLarge(Exception):
    pass


async def post_json(
    url: str, body: bytes, *, deadline_s: float = DEFAULT_DEADLINE_S
) -> tuple[int | None, bytes]:
    """(status, body) of the answer; (None, b"") when there was none within the deadline."""
    try:
        async with asyncio.timeout(deadline_s):
            return await _exchange(url, body)
    except (TimeoutError, OSError, ValueError, h11.ProtocolError, AnswerTooLarge):
        return None, b""


async def _exchange(url: str, body: bytes) -> tuple[int, bytes]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("not an http(s) URL")
    tls = ssl.create_default_context() if parts.scheme == "https" else None
    port = parts.port or (443 if tls is not None else 80)
    reader, writer = await asyncio.open_connection(
        parts.hostname, port, ssl=tls, server_hostname=parts.hostname if tls else None
    )
    try:
        conn = h11.Connection(h11.CLIENT)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
        request = h11.Request(
            method="POST",
            target=target,
            headers=[
                ("Host", host),
                ("Content-Type", "application/json"),
                ("Accept", "application/json"),
                ("Content-Length", str(len(body))),
                ("Connection", "close"),
            ],
        )
        writer.write(
            conn.send(request) + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
        )
        await writer.drain()
        return await _answer(conn, reader)
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


async def _answer(conn: h11.Connection, reader: asyncio.StreamReader) -> tuple[int, bytes]:
    status: int | None = None
    data = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(65536))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            data += event.data
            if len(data) > MAX_ANSWER_BYTES:
                raise AnswerTooLarge
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            if status is None:
                raise ValueError("no answer")
            return status, bytes(data)
