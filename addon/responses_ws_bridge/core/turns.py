"""One bridged request as the shell carries it: what was decided, and what happened.

`Turn` is fixed in the `request` hook; its `report` fills in as attempts run
and is read back by the addon (flow metadata, comment) and the recorder, so no
one has to look a turn up by flow id.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from responses_ws_bridge.core.affinity import Affinity
from responses_ws_bridge.core.create_request import CreateRequest
from responses_ws_bridge.core.handshake_headers import UpstreamCredential
from responses_ws_bridge.core.pool_routes import Route
from responses_ws_bridge.core.upstream_trust import Endpoint

# Outcomes that are no failure's: a turn or attempt still running, a client that left,
# a request answered with an HTTP error, a stream the upstream broke off after events.
# An attempt's other outcomes are its terminal event or `failures.outcome(failure)`.
PENDING = "pending"
CLIENT_GONE = "client_gone"
ERROR = "error"
STREAM_INCOMPLETE = "stream_incomplete"


@dataclass(frozen=True)
class Destination:
    """Where the client meant to send the request."""

    scheme: str
    host: str
    port: int
    path: str


@dataclass
class Attempt:
    """One upstream attempt, as the client flow's metadata shows it."""

    number: int
    account: str | None
    url: str
    reused: bool = False
    # The upgrade went out on a TCP/TLS connection made ahead of the request.
    preconnected: bool = False
    outcome: str = PENDING
    close_code: int | None = None
    detail: str = ""
    upstream_flow: str | None = None
    # Which access token the handshake carried (`token_refresh.fingerprint`), never shown.
    credential_tag: str | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, object]:
        return {
            k: v for k, v in self.__dict__.items() if v not in (None, "") and k != "credential_tag"
        }


@dataclass
class TurnReport:
    """What happened to a turn, for the client flow's metadata and the log."""

    affinity: Affinity
    account: str | None = None
    outcome: str = PENDING
    status: int | None = None
    # The error answer's `error.code`, when the outcome is ERROR.
    code: str | None = None
    attempts: list[Attempt] = field(default_factory=list)
    # What the turn is: "bridged" (over a WebSocket), or a forwarded route's name.
    label: str = "bridged"

    def describe(self) -> str:
        """The client flow's comment: one line for the turn, one per attempt."""
        affinity = self.affinity
        head = f"{self.label} · {affinity.kind.value}"
        if affinity.key:
            head += f" {affinity.key}"
        head += f" · account {self.account or '(client credential)'} · {self.outcome}"
        return "\n".join([head, *(_describe_attempt(a) for a in self.attempts)])


def _describe_attempt(attempt: Attempt) -> str:
    parts = [f"attempt {attempt.number}: {attempt.account or '(client)'}", attempt.outcome]
    if attempt.reused:
        parts.append("reused socket")
    if attempt.preconnected:
        parts.append("preconnected")
    if attempt.close_code is not None:
        parts.append(f"close {attempt.close_code}")
    if attempt.detail:
        parts.append(attempt.detail)
    return " · ".join(parts)


@dataclass(frozen=True)
class ForwardedHttp:
    """A request the pool forwards over HTTP instead of carrying it over a WebSocket."""

    route: Route
    method: str
    # As the client sent it, its Content-Encoding kept (the upstream sees the same bytes).
    body: bytes = field(default=b"", repr=False)


@dataclass(frozen=True)
class Turn:
    """Everything decided about one client request in the `request` hook."""

    flow_id: str
    create: CreateRequest
    client_headers: tuple[tuple[str, str], ...]
    request_id: str
    destination: Destination
    affinity: Affinity
    # Pass-through mode only: the client's own credential, placed deliberately.
    client_credential: UpstreamCredential | None
    # The configured target of the reverse-mode listener the client came in on.
    reverse_target: Endpoint | None = None
    # The proxy's own listen addresses (and the one the client reached): never an upstream.
    own_endpoints: tuple[Endpoint, ...] = ()
    # Set for a request the pool forwards over HTTP (`forward_engine`); `create` then
    # holds its parsed JSON body (or {}) and no message.
    http: ForwardedHttp | None = None
    report: TurnReport = field(init=False, compare=False)

    def __post_init__(self) -> None:
        label = "bridged" if self.http is None else f"forwarded {self.http.route.kind.value}"
        object.__setattr__(self, "report", TurnReport(self.affinity, label=label))
