"""What a turn engine asks of the shell (commands) and what the shell answers (events).

The engine (`turn_engine.TurnEngine`) yields one command at a time and is
sent back the event that answers it, as mitmproxy's proxy layers yield
commands and are fed events. Each command says which answer it gets:

| command        | carried out by          | answer                                   |
|----------------|-------------------------|------------------------------------------|
| FindOwner      | the turn state          | Owned / Unbound / FailClosed             |
| Choose         | the turn state          | Chosen / AllCoolingDown / NoneUsable / FailClosed |
| Bind           | the turn state          | None                                     |
| Hold / Unhold  | the turn state (load, lease) | None                                |
| NoteFigures    | the turn state          | the account's figures now (or None)      |
| Failed         | the turn state (health) | True when the account is still usable    |
| Disable        | the turn state          | None                                     |
| PublishOwner   | the turn state          | None                                     |
| Served         | the turn state          | None                                     |
| GetToken       | the token refresher     | the access token, or RefreshRefused      |
| Refresh        | the token refresher     | True (a new token), False, or RefreshRefused |
| Checkout       | the idle socket pool    | SocketReady, or None (no idle socket)    |
| Open           | the upstream client     | SocketReady, or Broke                    |
| Send           | the socket              | None, or Broke                           |
| Receive        | the socket              | Frames, TimedOut, or Broke               |
| Release        | the socket pool         | None                                     |
| StartStream, Write, Finish, Respond | the client | None, or ClientLeft             |
| Sleep, Log     | the shell               | None                                     |

Any command may instead be answered `ClientLeft` when the client went away
while it ran; the engine then lets go of what it holds and stops.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from responses_ws_bridge.core.accounts import Account
from responses_ws_bridge.core.affinity import SessionKey
from responses_ws_bridge.core.attempt_plan import PickAny, PickOwner
from responses_ws_bridge.core.failures import Failure
from responses_ws_bridge.core.rate_limits import RateLimits
from responses_ws_bridge.core.turns import Attempt

Headers = Sequence[tuple[str, str]]

# --- the turn state ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Owned:
    """The turn's keys belong to `account_id` (`from_store`: the shared store said so)."""

    account_id: str
    from_store: bool = True


@dataclass(frozen=True)
class Unbound:
    """No owner yet: choose an account (preferring `prefer`) and bind it."""

    prefer: str | None = None


@dataclass(frozen=True)
class FailClosed:
    """Answer 503 `state_store_unavailable`; `reason` is the store's failure."""

    reason: str


OwnerDecision = Owned | Unbound | FailClosed


@dataclass(frozen=True)
class FindOwner:
    """Who owns the turn's affinity keys, before the first attempt."""


@dataclass(frozen=True)
class Choose:
    """An account for the next attempt; `claim`: bind a new hard key to the one chosen."""

    pick: PickOwner | PickAny
    claim: bool


@dataclass(frozen=True)
class Bind:
    account_id: str


@dataclass(frozen=True)
class Hold:
    """An attempt starts on `account_id`: it counts as in flight there."""

    account_id: str


@dataclass(frozen=True)
class Unhold:
    account_id: str


@dataclass(frozen=True)
class NoteFigures:
    """The upstream told the account's rate-limit figures (None: only read them)."""

    account_id: str
    limits: RateLimits | None


@dataclass(frozen=True)
class Failed:
    account_id: str
    failure: Failure


@dataclass(frozen=True)
class Disable:
    account_id: str
    reason: str


@dataclass(frozen=True)
class PublishOwner:
    """A completed response's owner, before its terminal event reaches the client."""

    account_id: str
    response_id: str


@dataclass(frozen=True)
class Served:
    """The turn reached its client from `account_id` (`response_id`: a completed response)."""

    account_id: str
    response_id: str | None


# --- tokens --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GetToken:
    account: Account


@dataclass(frozen=True)
class Refresh:
    """The handshake carrying the token tagged `used_tag` was refused 401."""

    account: Account
    used_tag: str


@dataclass(frozen=True)
class RefreshRefused:
    reason: str
    permanent: bool
    retry_after_s: float | None = None


# --- the upstream socket ---------------------------------------------------------------------


@dataclass(frozen=True)
class Checkout:
    """An idle socket of `key`, for `attempt` (recorded on it from now on)."""

    key: SessionKey
    attempt: Attempt


@dataclass(frozen=True)
class Open:
    url: str
    headers: Headers
    account_id: str | None
    attempt: Attempt


@dataclass(frozen=True)
class SocketReady:
    """A socket serves the attempt: its 101's headers; whether TCP/TLS were made ahead."""

    response_headers: Headers
    preconnected: bool = False


@dataclass(frozen=True)
class Send:
    text: str | bytes


@dataclass(frozen=True)
class Receive:
    """The next frames, or TimedOut after `timeout_s` (None: wait as long as it takes)."""

    timeout_s: float | None


@dataclass(frozen=True)
class Frames:
    frames: Sequence[str | bytes]


@dataclass(frozen=True)
class TimedOut:
    pass


@dataclass(frozen=True)
class Broke:
    """The socket failed (closed, lost, refused, unreachable)."""

    failure: Failure


@dataclass(frozen=True)
class Release:
    """The attempt is done with its socket: keep it for the key's next turn, or close it.

    `turn_state`: one a metadata event issued after the 101; the socket's next
    turn answers with it (`answer_headers`).
    """

    key: SessionKey | None
    keep: bool
    code: int | None = None
    reason: str = ""
    turn_state: str | None = None


# --- the client ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StartStream:
    status: int
    headers: Headers


@dataclass(frozen=True)
class Write:
    data: bytes


@dataclass(frozen=True)
class Finish:
    pass


@dataclass(frozen=True)
class Respond:
    status: int
    headers: Headers
    body: bytes


@dataclass(frozen=True)
class ClientLeft:
    """The client went away (or the proxy stops) while a command ran."""


# --- the shell itself ------------------------------------------------------------------------


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class Log:
    message: str


Command = (
    FindOwner
    | Choose
    | Bind
    | Hold
    | Unhold
    | NoteFigures
    | Failed
    | Disable
    | PublishOwner
    | Served
    | GetToken
    | Refresh
    | Checkout
    | Open
    | Send
    | Receive
    | Release
    | StartStream
    | Write
    | Finish
    | Respond
    | Sleep
    | Log
)
