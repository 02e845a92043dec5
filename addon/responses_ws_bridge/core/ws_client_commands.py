"""What a WebSocket client's engine asks of the shell beyond a turn's commands.

`ws_client_engine.WsClientEngine` serves one client WebSocket over the pool:
the turn engine's state, token and socket commands (`turn_commands`) for the
upstream side, and these for the client's side and the session's turns:

| command       | carried out by            | answer                                           |
|---------------|---------------------------|--------------------------------------------------|
| AcceptClient  | the client's upgrade      | None (the client has its 101)                    |
| RefuseClient  | the client's upgrade      | None (an HTTP answer instead of the 101)         |
| ClientRecv    | the client socket         | ClientText, or ClientClosed                      |
| ClientSend    | the client socket         | None                                             |
| ClientClose   | the client socket         | None (closed with that code, or dropped: None)   |
| NewTurn       | the shell                 | None (the state commands are the turn's now)     |
| Attach        | the held upstream socket  | None (its recording serves the attempt now)      |
| Idle          | the held upstream socket  | None (the turn is over; the socket stays open)   |

While an upstream command runs, a client that goes away is `ClientLeft`, as
for a bridged turn; while the engine waits for the client (`ClientRecv`),
its close is the answer, `ClientClosed`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from responses_ws_bridge.core.turns import Attempt, Turn

Headers = Sequence[tuple[str, str]]


@dataclass(frozen=True)
class AcceptClient:
    """Answer the client's upgrade with 101; `headers` beside the handshake's own."""

    headers: Headers


@dataclass(frozen=True)
class RefuseClient:
    status: int
    headers: Headers
    body: bytes = field(repr=False)


@dataclass(frozen=True)
class ClientRecv:
    """The client's next message (or its close)."""


@dataclass(frozen=True)
class ClientText:
    text: str = field(repr=False)


@dataclass(frozen=True)
class ClientClosed:
    """The client closed (`code` None: the connection dropped without a close frame)."""

    code: int | None
    reason: str = ""


@dataclass(frozen=True)
class ClientSend:
    data: str | bytes = field(repr=False)


@dataclass(frozen=True)
class ClientClose:
    """End the client's socket with `code` and `reason`; None: drop it without a close frame."""

    code: int | None
    reason: str = ""


@dataclass(frozen=True)
class NewTurn:
    """A `response.create` (or the handshake) starts a turn: its affinity and report."""

    turn: Turn


@dataclass(frozen=True)
class Attach:
    """The held upstream socket serves `attempt` (a later turn of the session)."""

    attempt: Attempt


@dataclass(frozen=True)
class Idle:
    """The turn is over; the upstream socket stays open for the session's next."""


WsClientCommand = (
    AcceptClient | RefuseClient | ClientRecv | ClientSend | ClientClose | NewTurn | Attach | Idle
)
