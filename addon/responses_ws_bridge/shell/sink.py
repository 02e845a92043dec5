"""Where the service writes its answer to the client: one HTTP response, streamed or whole."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class ClientGone(Exception):
    """The connection to the client is gone; nothing more can be written."""


class ClientSink(Protocol):
    """One HTTP response to the client, over mitmproxy's own connection to it.

    `start` sends the status and headers of a streamed response, `write` a body
    chunk, `finish` ends it; `respond` sends a whole response with a known
    length; `abort` cuts a streamed one short. Each raises `ClientGone` once
    the client has left.

    `write_now` is `write` for a caller that cannot wait (an upstream socket's
    data callback): it writes at once and says True when nothing has to wait
    for the client, else writes nothing and says False (then `write`, which
    waits as it must).
    """

    started: bool
    finished: bool

    async def start(self, status: int, headers: Sequence[tuple[str, str]]) -> None: ...

    async def write(self, data: bytes) -> None: ...

    def write_now(self, data: bytes) -> bool: ...

    async def finish(self) -> None: ...

    async def respond(
        self, status: int, headers: Sequence[tuple[str, str]], body: bytes
    ) -> None: ...

    async def abort(self, reason: str) -> None:
        """A streamed response is cut (not ended): the client sees it incomplete."""
        ...
