"""Incremental Content-Encoding decoding with a cap on decoded bytes."""

from __future__ import annotations

import gzip
import os
import sys
import zlib
from collections.abc import Callable

import brotli
import pytest
from responses_ws_bridge.core.body_decoding import (
    STEP,
    BodyDecodingError,
    DecodedTooLarge,
    StreamDecoder,
    UnsupportedEncoding,
    decode_body,
    parse_content_encoding,
)

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

BODY = b'{"model":"gpt-5","input":"' + os.urandom(3000).hex().encode() + b'"}'


def raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


ENCODERS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": gzip.compress,
    "x-gzip": gzip.compress,
    "deflate": zlib.compress,
    "br": brotli.compress,
    "zstd": zstd.compress,
    "identity": lambda b: b,
}


def encode(data: bytes, header: str) -> bytes:
    for coding in (c.strip().lower() for c in header.split(",") if c.strip()):
        data = ENCODERS[coding](data)
    return data


def chunked(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize(
    "header",
    ["", "identity", "gzip", "x-gzip", "deflate", "br", "zstd", "GZIP", "gzip, br", "deflate,zstd"],
)
@pytest.mark.parametrize("chunk", [1, 7, 4096, 1 << 20])
def test_round_trip_in_any_chunking(header: str, chunk: int) -> None:
    wire = encode(BODY, header)
    assert decode_body(chunked(wire, chunk), header, limit=len(BODY)) == BODY


def test_raw_deflate_is_accepted_as_deflate() -> None:
    assert decode_body(raw_deflate(BODY), "deflate", limit=len(BODY)) == BODY


def test_concatenated_gzip_members_and_zstd_frames() -> None:
    assert decode_body(gzip.compress(b"ab") + gzip.compress(b"cd"), "gzip", limit=4) == b"abcd"
    assert decode_body(zstd.compress(b"ab") + zstd.compress(b"cd"), "zstd", limit=4) == b"abcd"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("", ()),
        ("identity", ()),
        ("gzip", ("gzip",)),
        ("x-gzip", ("gzip",)),
        (" Gzip , BR ", ("br", "gzip")),  # undone last-applied first
        ("gzip, identity, zstd", ("zstd", "gzip")),
    ],
)
def test_parse_content_encoding(header: str, expected: tuple[str, ...]) -> None:
    assert parse_content_encoding(header) == expected


@pytest.mark.parametrize("header", ["compress", "gzip, lzma", "chunked", "gzip,gzip,gzip,gzip"])
def test_unknown_or_absurd_encodings_are_415(header: str) -> None:
    with pytest.raises(UnsupportedEncoding) as info:
        parse_content_encoding(header)
    assert info.value.status == 415


BOMB_SIZE = 16 * 1024 * 1024  # 16 MiB of zeros; a few KiB on the wire


@pytest.mark.parametrize("header", ["gzip", "deflate", "br", "zstd", "gzip, gzip", "zstd, br"])
def test_bomb_stops_at_the_cap_without_inflating_it(header: str) -> None:
    # Build the bomb once in memory from a small repeated block.
    wire = encode(b"\0" * BOMB_SIZE, header)
    assert len(wire) < BOMB_SIZE // 100
    limit = 1024 * 1024
    decoder = StreamDecoder(parse_content_encoding(header), limit=limit)
    held = 0
    with pytest.raises(DecodedTooLarge) as info:
        for piece in chunked(wire, 4096):
            out = decoder.feed(piece)
            held += len(out)
            # Nothing beyond the cap plus one step is ever handed out.
            assert held <= limit + STEP
    assert info.value.status == 413
    assert decoder.decoded <= limit + STEP


def test_exactly_the_cap_is_accepted() -> None:
    data = b"x" * 1000
    assert decode_body(gzip.compress(data), "gzip", limit=1000) == data
    with pytest.raises(DecodedTooLarge):
        decode_body(gzip.compress(data), "gzip", limit=999)
    with pytest.raises(DecodedTooLarge):
        decode_body(data, "", limit=999)


@pytest.mark.parametrize(
    ("wire", "header"),
    [
        (b"not gzip at all", "gzip"),
        (gzip.compress(BODY)[:-10], "gzip"),  # truncated
        (zlib.compress(BODY)[:-3], "deflate"),
        (brotli.compress(BODY)[:-3], "br"),
        (zstd.compress(BODY)[:-3], "zstd"),
        (b"\xff\xfe garbage", "br"),
        (b"garbage!", "zstd"),
        (zlib.compress(BODY) + b"trailing", "deflate"),
        (b"", "gzip"),
    ],
)
def test_corrupt_or_truncated_data_is_400(wire: bytes, header: str) -> None:
    with pytest.raises(BodyDecodingError) as info:
        decode_body(wire, header, limit=10 * len(BODY))
    assert info.value.status == 400
    assert not isinstance(info.value, DecodedTooLarge | UnsupportedEncoding)
