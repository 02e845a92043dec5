"""A bridged request's body, taken from mitmproxy as it streams in, decoded and capped.

mitmproxy buffers a request body whole before the `request` hook, however
large it is. A bridged flow instead gets a `BodyCollector` as its
`flow.request.stream` (set in `requestheaders`): mitmproxy hands it every
chunk as it arrives and forwards what it returns, which is nothing. The
collector decodes the Content-Encoding incrementally, keeps at most the cap
of decoded bytes (and of wire bytes), and resolves `result` with the body, or
with the error the client gets the moment the cap is passed or the data is
corrupt; the rest of the body is then read and dropped until the addon
closes the connection.
"""

from __future__ import annotations

import asyncio

from responses_ws_bridge.core import openai_errors
from responses_ws_bridge.core.body_decoding import BodyDecodingError, StreamDecoder
from responses_ws_bridge.core.openai_errors import HttpError


class BodyRefused(Exception):
    """The body was refused while it streamed in; `error` is the client's answer."""

    def __init__(self, error: HttpError) -> None:
        super().__init__(error.status)
        self.error = error


class BodyCollector:
    """`flow.request.stream` for a bridged flow; `await collector.result` gives the body."""

    def __init__(
        self, content_encoding: str | None, *, limit: int, keep_wire: bool = False
    ) -> None:
        self._limit = limit
        self._decoder: StreamDecoder | None = None
        self._parts: list[bytes] = []
        self.wire_bytes = 0
        # `keep_wire`: the body as sent is kept too (a forwarded request goes on as it came).
        self._wire: list[bytes] | None = [] if keep_wire else None
        self.result: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        try:
            self._decoder = StreamDecoder.for_header(content_encoding, limit=limit)
        except BodyDecodingError as exc:
            self._refuse(openai_errors.body_decoding_failed(exc))

    @property
    def refused(self) -> HttpError | None:
        if self.result.done() and not self.result.cancelled():
            exc = self.result.exception()
            if isinstance(exc, BodyRefused):
                return exc.error
        return None

    def __call__(self, chunk: bytes) -> bytes:
        if self.result.done() or self._decoder is None:
            return b""  # refused (or done): read and dropped
        try:
            if chunk:
                self.wire_bytes += len(chunk)
                if self.wire_bytes > self._limit:
                    self._refuse(openai_errors.request_too_large(None, self._limit))
                    return b""
                if self._wire is not None:
                    self._wire.append(chunk)
                self._keep(self._decoder.feed(chunk))
            else:  # mitmproxy's end of the body
                self._keep(self._decoder.finish())
                parts, self._parts = self._parts, []
                # A body that came in one piece is that piece, not a copy of it.
                self.result.set_result(parts[0] if len(parts) == 1 else b"".join(parts))
        except BodyDecodingError as exc:
            self._refuse(openai_errors.body_decoding_failed(exc))
        return b""

    def _keep(self, decoded: bytes) -> None:
        if decoded:
            self._parts.append(decoded)

    @property
    def wire(self) -> bytes:
        """The body as it was sent (with `keep_wire`; b"" otherwise)."""
        return b"".join(self._wire or ())

    def cancel(self) -> None:
        """The flow ended first (error hook): nobody will wait for the body."""
        if not self.result.done():
            self.result.cancel()
        self._parts = []

    def _refuse(self, error: HttpError) -> None:
        self._parts = []
        if self._wire is not None:
            self._wire = []
        if not self.result.done():
            self.result.set_exception(BodyRefused(error))
            # Retrieved by whoever awaits; never "exception was never retrieved".
            self.result.exception()
