"""The clocks a turn waits on while it reads upstream events, and which one rings first.

A turn waiting for frames has up to four deadlines at once; the engine asks
`next_timer` for the earliest (ties: the one listed first wins), waits for
frames at most that long, and acts on it when it rings:

| timer       | runs from                   | for                         | when it rings        |
|-------------|-----------------------------|-----------------------------|----------------------|
| FIRST_EVENT | the request's arrival, over | `bridge_first_event_timeout`| the request fails,   |
|             | every attempt, until its    | (240 s: the peers expire a  | no retry: 504        |
|             | first Responses event       | request without one)        | upstream_timeout     |
| SILENT      | the last upstream frame (or | `bridge_stream_idle_timeout`| the attempt fails (a |
|             | the request sent)           | (300 s: a gap between them) | retry before events) |
| RELEASE     | the first held event        | `bridge_hold_created` (2 s) | held events written  |
| KEEPALIVE   | the last frame or keepalive | `bridge_sse_keepalive` (15s)| the client's         |
|             |                             |                             | keepalive written    |

Before the first event, FIRST_EVENT bounds the whole request: a silent
upstream costs 240 s, not 300 s per attempt times three.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import IntEnum


class Timer(IntEnum):
    # Value = precedence on a tie.
    FIRST_EVENT = 0
    SILENT = 1
    RELEASE = 2
    KEEPALIVE = 3


def next_timer(timers: Iterable[tuple[float | None, Timer]]) -> tuple[float, Timer] | None:
    """The timer that rings first, with when (None: nothing to wait for but frames)."""
    armed = [(at, timer) for at, timer in timers if at is not None]
    return min(armed, key=lambda armed_timer: (armed_timer[0], armed_timer[1])) if armed else None


def after(start: float, seconds: float | None) -> float | None:
    """`start + seconds`, or None when the timer is off (None or 0)."""
    return start + seconds if seconds else None
