"""A `ClientSink` for in-process tests: records the service's answer as a client would see it."""

from __future__ import annotations

from collections.abc import Sequence

import httpx
from responses_ws_bridge.shell.sink import ClientGone


class RecordingSink:
    """One client response, kept in memory: every call in order, the head and the body.

    `hang_up_after`: the client leaves after that many body writes, so the next
    call (and every later one) raises `ClientGone`; `hang_up()` makes it leave now.
    """

    def __init__(self, *, hang_up_after: int | None = None) -> None:
        self.started = False
        self.finished = False
        self.gone = False
        self.status: int | None = None
        self.headers: list[tuple[str, str]] = []
        self.chunks: list[bytes] = []
        # "start", "write", "finish", "respond", "abort", in the order the service called them.
        self.calls: list[str] = []
        self._hang_up_after = hang_up_after
        # Why the service cut a streamed response short (None: it did not).
        self.aborted: str | None = None
        # A client too slow for writes at once: every write waits (`write`).
        self.stall = False

    def hang_up(self) -> None:
        self.gone = True

    async def start(self, status: int, headers: Sequence[tuple[str, str]]) -> None:
        self._call("start")
        assert not self.started, "the response was started twice"
        self.started = True
        self.status, self.headers = status, list(headers)

    async def write(self, data: bytes) -> None:
        self._call("write")
        assert self.started and not self.finished, "a body write outside a streamed response"
        self._take(data)

    def _take(self, data: bytes) -> None:
        self.chunks.append(data)
        if self._hang_up_after is not None and len(self.chunks) >= self._hang_up_after:
            self.gone = True

    def write_now(self, data: bytes) -> bool:
        """The upstream's data callback writes at once (`stall`: the client is slow)."""
        if self.stall:
            return False
        self._call("write")
        assert self.started and not self.finished, "a body write outside a streamed response"
        self._take(data)
        return True

    async def finish(self) -> None:
        self._call("finish")
        assert self.started and not self.finished, "a streamed response was finished twice"
        self.finished = True

    async def respond(self, status: int, headers: Sequence[tuple[str, str]], body: bytes) -> None:
        self._call("respond")
        assert not self.started, "a whole response after the head went out"
        self.started = self.finished = True
        self.status, self.headers = status, list(headers)
        self.chunks.append(body)

    async def abort(self, reason: str) -> None:
        self._call("abort")
        assert self.started and not self.finished, "a cut outside a streamed response"
        self.finished = True
        self.aborted = reason

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def response(self) -> httpx.Response:
        """What the client received, as an `httpx.Response` (a cut stream: what arrived)."""
        assert self.status is not None, "the service answered nothing"
        return httpx.Response(self.status, headers=self.headers, content=self.body)

    def _call(self, name: str) -> None:
        if self.gone:
            raise ClientGone
        self.calls.append(name)
