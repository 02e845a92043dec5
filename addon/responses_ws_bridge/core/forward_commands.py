"""What a forwarded request's engine asks of the shell beyond a turn's commands.

`forward_engine.ForwardEngine` yields the turn engine's state, token and
client commands (`turn_commands`) and these, for one HTTP exchange upstream
and the shared answer cache:

| command      | carried out by           | answer                                        |
|--------------|--------------------------|-----------------------------------------------|
| Fetch        | the HTTP client          | Fetched (the answer's head), or Broke         |
| ReadBody     | the HTTP client          | BodyChunk, TimedOut, or Broke                 |
| DropFetch    | the HTTP client          | None (the exchange's connection is closed)    |
| CacheLookup  | the answer cache         | a CachedAnswer, or None: fetch it (and store) |
| CacheStore   | the answer cache         | None                                          |
| Abort        | the client               | None (a streamed answer is cut, not ended)    |

A `CacheLookup` answered None makes its engine the one that fetches for
everyone asking the same meanwhile: it must end with a `CacheStore` (None
when it got nothing to keep), and the shell makes sure of it when the engine
stops early.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from responses_ws_bridge.core.forward_policy import CachedAnswer
from responses_ws_bridge.core.turns import Attempt

Headers = Sequence[tuple[str, str]]


@dataclass(frozen=True)
class Fetch:
    """Send one HTTP request upstream; wait at most `timeout_s` for its answer's head."""

    url: str
    method: str
    headers: Headers
    body: bytes = field(repr=False)
    attempt: Attempt
    timeout_s: float | None


@dataclass(frozen=True)
class Fetched:
    status: int
    reason: str
    headers: Headers


@dataclass(frozen=True)
class ReadBody:
    """The next piece of the answer's body. `whole`: read it all, up to that many bytes."""

    timeout_s: float | None
    whole: int | None = None


@dataclass(frozen=True)
class BodyChunk:
    """Body bytes; `end`: the body is complete (with `whole`: False when it was cut)."""

    data: bytes
    end: bool


@dataclass(frozen=True)
class DropFetch:
    """Done with the exchange: its connection is closed (an unread rest is dropped)."""


@dataclass(frozen=True)
class CacheLookup:
    key: str


@dataclass(frozen=True)
class CacheStore:
    key: str
    answer: CachedAnswer | None


@dataclass(frozen=True)
class Abort:
    """The upstream failed after the answer's head went out: the client's answer is cut."""

    reason: str


ForwardCommand = Fetch | ReadBody | DropFetch | CacheLookup | CacheStore | Abort
