"""A served turn as metrics: read from its report when it ends, so the service needs no calls.

`observe` runs the service's `serve` for one turn, notes when the SSE stream
starts (the first event reaches the client) and, however the turn ends,
records the request, each upstream attempt and each retry from the turn's
report. `TurnMetrics` is what it records to (`shell.metrics.BridgeMetrics`,
which needs `prometheus_client`; this module does not).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from responses_ws_bridge.core import http_fields
from responses_ws_bridge.core.turns import Attempt, Turn, TurnReport
from responses_ws_bridge.shell.sink import ClientSink

CLIENT_GONE = "client_gone"


class TurnMetrics(Protocol):
    def request_finished(self, outcome: str, affinity: str, duration_s: float) -> None: ...

    def attempt(self, result: str, close_code: int | None = None) -> None: ...

    def account_request(self, account: str | None, affinity: str) -> None: ...

    def account_attempt(self, account: str | None, result: str, socket: str) -> None: ...

    def retry(self, target: str) -> None: ...

    def first_event(self, affinity: str, seconds: float) -> None: ...


class _StartWatch:
    """Passes everything to the client's sink; tells `on_stream` when an SSE stream starts."""

    def __init__(self, inner: ClientSink, on_stream: Callable[[], None]) -> None:
        self._inner = inner
        self._on_stream = on_stream
        self.started = False
        self.finished = False
        self.status: int | None = None

    async def start(self, status: int, headers: Sequence[tuple[str, str]]) -> None:
        self.status, self.started = status, True
        if "text/event-stream" in http_fields.values(headers, "content-type"):
            self._on_stream()
        await self._inner.start(status, headers)

    async def write(self, data: bytes) -> None:
        await self._inner.write(data)

    def write_now(self, data: bytes) -> bool:
        return self._inner.write_now(data)

    async def finish(self) -> None:
        self.finished = True
        await self._inner.finish()

    async def respond(self, status: int, headers: Sequence[tuple[str, str]], body: bytes) -> None:
        self.status, self.started, self.finished = status, True, True
        await self._inner.respond(status, headers, body)

    async def abort(self, reason: str) -> None:
        self.finished = True
        await self._inner.abort(reason)


async def observe(
    serve: Callable[[Turn, ClientSink], Awaitable[None]],
    turn: Turn,
    sink: ClientSink,
    metrics: TurnMetrics,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    started = clock()
    first_event: float | None = None

    def on_stream() -> None:
        nonlocal first_event
        first_event = clock()

    outcome: str | None = None
    try:
        await serve(turn, _StartWatch(sink, on_stream))
    except BaseException:
        outcome = CLIENT_GONE
        raise
    finally:
        affinity = turn.affinity.kind.value
        if first_event is not None:
            metrics.first_event(affinity, first_event - started)
        record_report(metrics, turn.report, outcome or turn.report.outcome, clock() - started)


def record_report(
    metrics: TurnMetrics, report: TurnReport, outcome: str, duration_s: float
) -> None:
    affinity = report.affinity.kind.value
    for i, attempt in enumerate(report.attempts):
        metrics.attempt(attempt.outcome, attempt.close_code)
        metrics.account_attempt(attempt.account, attempt.outcome, _socket(attempt))
        if i:
            moved = attempt.account != report.attempts[i - 1].account
            metrics.retry("other" if moved else "same")
    if report.attempts:
        metrics.account_request(report.attempts[-1].account, affinity)
    metrics.request_finished(outcome, affinity, duration_s)


def _socket(attempt: Attempt) -> str:
    if attempt.reused:
        return "reused"
    return "preconnected" if attempt.preconnected else "new"
