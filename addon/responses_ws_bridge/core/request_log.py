"""One log line per request the bridge answers, in plain words.

What the client got (status and outcome, or the error code), from which
account, under which affinity, on which kind of socket, and how fast: the
first event (a streamed answer) or the answer (a JSON body or an error), then
the whole. The attempts' details are in the flow and at debug level; the
affinity key and credentials are never part of the line.

    POST /v1/responses: 200 response.completed · account team-a · hard affinity ·
        reused socket · first event 3 ms, done 12 ms
    POST /v1/responses: 502 upstream_unreachable · account team-a · no affinity ·
        3 attempts, the last connect_failed · 312 ms
    POST /v1/responses: 401 invalid_client_key · 0 ms
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from responses_ws_bridge.core.turns import CLIENT_GONE, ERROR, Attempt, TurnReport

SEPARATOR = " · "
# How a forwarded request's outcome reads (`core.forward_engine`): "http 200", "cached 200".
FORWARDED, CACHED = "http ", "cached "


@dataclass(frozen=True)
class Answered:
    """How the client's answer went out, as the addon saw it."""

    status: int | None
    # The error body's `error.code`, when the answer was an error.
    code: str | None = None
    streamed: bool = False
    # Seconds from the request to its first answer bytes (None: none went out), and to its end.
    first_s: float | None = None
    total_s: float = 0.0


def request_line(method: str, path: str, answered: Answered, report: TurnReport | None) -> str:
    """The line for one request; `report` None: answered before any turn (checks, refusals)."""
    head = f"{method} {path.partition('?')[0]}: {_result(answered, report)}"
    parts = [head]
    if report is not None:
        parts += _turn_parts(report)
    parts.append(_timing(answered, report))
    return SEPARATOR.join(p for p in parts if p)


def _result(answered: Answered, report: TurnReport | None) -> str:
    outcome = report.outcome if report is not None else ERROR
    if outcome == CLIENT_GONE:
        return "the client left before the end (client_gone)"
    status = f"{answered.status} " if answered.status is not None else ""
    if outcome == ERROR:
        return f"{status}{answered.code or (report.code if report else None) or 'error'}"
    if _forwarded(outcome):
        # A pool's forwarded request: the upstream's own answer, or the models cache's.
        return f"{status}{'from the cache' if outcome.startswith(CACHED) else 'forwarded'}"
    return f"{status}{outcome}"


def _forwarded(outcome: str) -> bool:
    return outcome.startswith((FORWARDED, CACHED))


def _turn_parts(report: TurnReport) -> list[str]:
    kind = report.affinity.kind.value
    affinity = "no affinity" if kind == "none" else f"{kind} affinity"
    if not report.attempts:
        return [affinity]
    last = report.attempts[-1]
    parts = [f"account {last.account or '(client credential)'}", affinity]
    tries = len(report.attempts)
    if report.outcome == ERROR:
        plural = "s" if tries > 1 else ""
        parts.append(f"{tries} attempt{plural}, the last {last.outcome}")
        return parts
    if not _forwarded(report.outcome):
        parts.append(_socket(last))
    if tries > 1:
        parts.append(f"{tries} attempts")
    return parts


def _socket(attempt: Attempt) -> str:
    if attempt.reused:
        return "reused socket"
    if attempt.preconnected:
        return "new socket on a connection made ahead"
    return "new socket"


def socket_line(method: str, path: str, reports: Sequence[TurnReport], total_s: float) -> str:
    """The line for a client's WebSocket the pool served, once it ended: its turns in one."""
    first = reports[0] if reports else None
    if first is not None and first.outcome == ERROR and first.status not in (None, 101):
        # Refused before the 101: told as the HTTP answer it got.
        refused = Answered(first.status, first.code, total_s=total_s)
        return request_line(method, path, refused, first)
    turns = [r for r in reports if r.outcome != "101"]
    counts = Counter(r.outcome for r in turns)
    said = ", ".join(f"{n} {o}" if n > 1 else o for o, n in counts.items())
    plural = "" if len(turns) == 1 else "s"
    head = f"{method} {path.partition('?')[0]}: WebSocket, {len(turns)} turn{plural}"
    parts = [head + (f" ({said})" if said else "")]
    if first is not None:
        account = next((r.account for r in reversed(reports) if r.account), None)
        kind = first.affinity.kind.value
        parts.append(f"account {account or '(client credential)'}")
        parts.append("no affinity" if kind == "none" else f"{kind} affinity")
    parts.append(f"open {_ms(total_s)}")
    return SEPARATOR.join(parts)


def _timing(answered: Answered, report: TurnReport | None) -> str:
    total = _ms(answered.total_s)
    if answered.first_s is None or report is None:
        return total
    if answered.streamed and not _forwarded(report.outcome):
        return f"first event {_ms(answered.first_s)}, done {total}"
    if abs(answered.total_s - answered.first_s) < 0.0005:
        return total
    return f"answered {_ms(answered.first_s)}, done {total}"


def _ms(seconds: float) -> str:
    return f"{max(seconds, 0.0) * 1000:.0f} ms"
