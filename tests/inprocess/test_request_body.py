"""BodyCollector: the body as mitmproxy streams it, decoded, capped, never forwarded."""

from __future__ import annotations

import asyncio
import gzip

import pytest
from responses_ws_bridge.shell.request_body import BodyCollector, BodyRefused

from tests.support.hostile_client import gzip_bomb


def collect(chunks: list[bytes], encoding: str | None, limit: int) -> bytes | int:
    """The body, or the refusal's status; every chunk must be swallowed (b"")."""

    async def main() -> bytes | int:
        collector = BodyCollector(encoding, limit=limit)
        for chunk in [*chunks, b""]:
            assert collector(chunk) == b""
        try:
            return await collector.result
        except BodyRefused as refused:
            assert collector.refused is refused.error
            return refused.error.status

    return asyncio.run(main())


def pieces(data: bytes, size: int = 1000) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize(
    ("chunks", "encoding", "limit", "expected"),
    [
        (pieces(b"x" * 5000), None, 5000, b"x" * 5000),
        (pieces(b"x" * 5001), None, 5000, 413),
        (pieces(gzip.compress(b"y" * 5000)), "gzip", 5000, b"y" * 5000),
        (pieces(gzip_bomb(10_000_000)), "gzip", 5000, 413),
        ([b"not gzip"], "gzip", 5000, 400),
        ([b"{}"], "compress", 5000, 415),
        ([], None, 10, b""),
    ],
)
def test_collector(
    chunks: list[bytes], encoding: str | None, limit: int, expected: bytes | int
) -> None:
    assert collect(chunks, encoding, limit) == expected


def test_after_a_refusal_the_rest_is_dropped_unread() -> None:
    async def main() -> None:
        collector = BodyCollector(None, limit=10)
        collector(b"x" * 11)
        assert collector.refused is not None and collector.refused.status == 413
        for _ in range(1000):
            assert collector(b"z" * 65536) == b""
        assert collector.wire_bytes == 11  # nothing after the refusal is even counted

    asyncio.run(main())


def test_a_body_that_came_in_one_piece_is_that_piece_not_a_copy() -> None:
    async def main() -> None:
        chunk = b'{"input": "' + b"x" * 40_000 + b'"}'
        collector = BodyCollector(None, limit=1 << 20)
        collector(chunk)
        collector(b"")
        assert (await collector.result) is chunk

    asyncio.run(main())
