"""Incremental decoding of a request body's Content-Encoding, with a cap on decoded bytes.

A compressed body is decoded as it arrives, a bounded step at a time, so a
compression bomb (a few KiB that inflate to gigabytes) is stopped as soon as
the decoded bytes pass the cap: nothing here ever holds more than the cap plus
one step. Every layer of a stacked encoding (`gzip, br`) is bounded the same
way, so an inner layer that yields nothing (zstd skippable frames) cannot make
an outer one inflate without end either.

Supported: `gzip` / `x-gzip` (concatenated members too), `deflate` (zlib
wrapper, or raw deflate as some clients send it), `br`, `zstd`, `identity`.
`brotli` and zstd (`compression.zstd`, or its backport before Python 3.14)
are mitmproxy's own dependencies. No I/O.
"""

from __future__ import annotations

import sys
import zlib
from collections.abc import Iterable, Sequence
from typing import Protocol

import brotli

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

STEP = 64 * 1024
MAX_LAYERS = 3
_ALIASES = {"x-gzip": "gzip"}
SUPPORTED = ("gzip", "x-gzip", "deflate", "br", "zstd", "identity")


class BodyDecodingError(Exception):
    """Why a body could not be decoded; `status` is the HTTP status the client gets."""

    status = 400
    code = "invalid_content_encoding"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UnsupportedEncoding(BodyDecodingError):
    status = 415
    code = "unsupported_content_encoding"


class DecodedTooLarge(BodyDecodingError):
    status = 413
    code = "request_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"request body is larger than {limit} bytes once decoded; "
            f"the bridge accepts at most {limit} bytes"
        )
        self.limit = limit


def parse_content_encoding(value: str) -> tuple[str, ...]:
    """The codings to undo, in the order to undo them (the last applied first).

    `identity` is dropped; `x-gzip` is `gzip`. Raises UnsupportedEncoding for
    anything else, or for more than MAX_LAYERS codings (no client stacks more).
    """
    codings: list[str] = []
    for raw in value.split(","):
        token = raw.strip().lower()
        if not token or token == "identity":
            continue
        token = _ALIASES.get(token, token)
        if token not in SUPPORTED:
            shown = raw.strip()[:40]
            raise UnsupportedEncoding(
                f"Content-Encoding {shown!r} is not supported; use gzip, deflate, br, zstd or none"
            )
        codings.append(token)
    if len(codings) > MAX_LAYERS:
        raise UnsupportedEncoding(
            f"Content-Encoding stacks {len(codings)} codings; at most {MAX_LAYERS} are accepted"
        )
    return tuple(reversed(codings))


class _Layer(Protocol):
    def decompress(self, data: bytes, max_length: int) -> bytes:
        """At most about `max_length` bytes of output; call again with b"" until needs_input."""
        ...

    @property
    def needs_input(self) -> bool: ...

    def check_end(self) -> None:
        """Raise BodyDecodingError when the data so far is not a complete stream."""
        ...


class _Zlib:
    """gzip (members may follow each other) or deflate, zlib-wrapped or raw."""

    def __init__(self, coding: str) -> None:
        self._coding = coding
        self._d: zlib._Decompress | None = None
        self._tail = b""
        self._more = False

    def _new(self, head: bytes) -> zlib._Decompress:
        if self._coding == "gzip":
            return zlib.decompressobj(16 + zlib.MAX_WBITS)
        # A zlib header is 2 bytes whose big-endian value is a multiple of 31,
        # method 8; anything else is raw deflate, which some clients send.
        wrapped = len(head) >= 2 and head[0] & 0x0F == 8 and (head[0] << 8 | head[1]) % 31 == 0
        return zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)

    def decompress(self, data: bytes, max_length: int) -> bytes:
        buf = self._tail + data if self._tail else data
        if self._d is None:
            if self._coding == "deflate" and len(buf) < 2:
                self._tail, self._more = buf, False
                return b""
            self._d = self._new(buf)
        if self._d.eof:
            buf = self._after_end(buf)
            if not buf:
                self._tail, self._more = b"", False
                return b""
        try:
            out = self._d.decompress(buf, max_length)
        except zlib.error as exc:
            raise BodyDecodingError(
                f"request body is not valid {self._coding} data: {exc}"
            ) from None
        self._tail = self._d.unconsumed_tail
        if self._d.eof and self._d.unused_data:
            self._tail = self._d.unused_data + self._tail
        # Exactly max_length out may leave output pending: ask again.
        self._more = bool(self._tail) or len(out) >= max_length
        return out

    def _after_end(self, buf: bytes) -> bytes:
        if self._coding == "gzip":
            # RFC 1952: a gzip file is a series of members.
            self._d = self._new(buf)
            return buf
        if buf:
            raise BodyDecodingError("request body has data after the end of its deflate stream")
        return buf

    @property
    def needs_input(self) -> bool:
        return not self._more

    def check_end(self) -> None:
        if self._d is None or not self._d.eof or self._tail:
            raise BodyDecodingError(f"request body is a truncated {self._coding} stream")


class _Brotli:
    def __init__(self) -> None:
        self._d = brotli.Decompressor()
        self._pending = False

    def decompress(self, data: bytes, max_length: int) -> bytes:
        if self._d.is_finished() and data:
            raise BodyDecodingError("request body has data after the end of its br stream")
        try:
            out: bytes = self._d.process(data, output_buffer_limit=max_length)
        except brotli.error as exc:
            raise BodyDecodingError(f"request body is not valid br data: {exc}") from None
        self._pending = not self._d.can_accept_more_data()
        return out

    @property
    def needs_input(self) -> bool:
        return not self._pending

    def check_end(self) -> None:
        if not self._d.is_finished():
            raise BodyDecodingError("request body is a truncated br stream")


class _Zstd:
    """zstd; frames may follow each other, as the format allows."""

    def __init__(self) -> None:
        self._d = zstd.ZstdDecompressor()

    def decompress(self, data: bytes, max_length: int) -> bytes:
        if self._d.eof:
            data = self._d.unused_data + data
            if not data:
                return b""
            self._d = zstd.ZstdDecompressor()
        try:
            out = self._d.decompress(data, max_length)
        except zstd.ZstdError as exc:
            raise BodyDecodingError(f"request body is not valid zstd data: {exc}") from None
        return out

    @property
    def needs_input(self) -> bool:
        if self._d.eof:
            return not self._d.unused_data
        return self._d.needs_input

    def check_end(self) -> None:
        if not self._d.eof:
            raise BodyDecodingError("request body is a truncated zstd stream")


def _layer(coding: str) -> _Layer:
    if coding == "br":
        return _Brotli()
    if coding == "zstd":
        return _Zstd()
    return _Zlib(coding)


class StreamDecoder:
    """Feeds body chunks through the codings; the decoded bytes come back capped.

    `feed` returns the decoded bytes the chunk completed; the running total is
    bounded by `limit` (DecodedTooLarge past it). Intermediate layers of a
    stack are bounded slightly above `limit`, since compressed data can be a
    little larger than what it holds.
    """

    def __init__(self, codings: Sequence[str], *, limit: int, step: int = STEP) -> None:
        self._layers = [_layer(c) for c in codings]
        self._limit = limit
        self._step = step
        self._produced = [0] * len(self._layers)
        self._layer_cap = limit + limit // 16 + 1024
        self._out: list[bytes] = []
        self.decoded = 0

    @classmethod
    def for_header(cls, content_encoding: str | None, *, limit: int) -> StreamDecoder:
        return cls(parse_content_encoding(content_encoding or ""), limit=limit)

    def feed(self, data: bytes) -> bytes:
        self._push(0, data)
        out, self._out = self._out, []
        return b"".join(out)

    def finish(self) -> bytes:
        """Whatever is left; raises BodyDecodingError if a stream is incomplete."""
        for layer in self._layers:
            layer.check_end()
        return b""

    def _push(self, index: int, data: bytes) -> None:
        if index == len(self._layers):
            self.decoded += len(data)
            if self.decoded > self._limit:
                raise DecodedTooLarge(self._limit)
            if data:
                self._out.append(data)
            return
        layer = self._layers[index]
        out = layer.decompress(data, self._step)
        while True:
            if out:
                self._produced[index] += len(out)
                if index + 1 < len(self._layers) and self._produced[index] > self._layer_cap:
                    raise DecodedTooLarge(self._limit)
                self._push(index + 1, out)
            if layer.needs_input:
                return
            out = layer.decompress(b"", self._step)


def decode_body(
    chunks: bytes | Iterable[bytes], content_encoding: str | None, *, limit: int
) -> bytes:
    """The whole decoded body, or BodyDecodingError; the input is read a step at a time."""
    decoder = StreamDecoder.for_header(content_encoding, limit=limit)
    if isinstance(chunks, bytes | bytearray | memoryview):
        data = bytes(chunks)
        chunks = (data[i : i + STEP] for i in range(0, len(data), STEP))
    out = [decoder.feed(chunk) for chunk in chunks]
    out.append(decoder.finish())
    return b"".join(out)
