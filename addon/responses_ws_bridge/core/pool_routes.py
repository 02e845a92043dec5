"""What a request through an account pool is: one row of the path table, decided once.

With an account pool the pool is the client's whole base URL: nothing goes
upstream with the client's own credential. `route` names what each request
is, from its method, path (query aside) and whether it asks for a WebSocket,
and that decides who serves it:

| method       | path ends in                     | upgrade   | route         | account          |
|--------------|----------------------------------|-----------|---------------|------------------|
| POST         | `/responses`                     | no        | BRIDGED       | affinity         |
| GET          | `/responses`                     | websocket | WEBSOCKET     | affinity         |
| POST         | `/responses/compact`             |           | COMPACT       | affinity         |
| GET, DELETE  | `/responses/{id}`                |           | ONE_RESPONSE  | its producer     |
| GET          | `/responses/{id}/input_items`    |           | ONE_RESPONSE  | its producer     |
| POST         | `/responses/{id}/cancel`         |           | ONE_RESPONSE  | its producer     |
| GET          | `/models`, `/models/{id}`        |           | MODELS        | any (cached)     |
| anything else|                                  |           | OTHER         | header affinity  |

`{id}` is one path segment that is not a sub-resource of `/responses`
(`compact`, `input_tokens`): `POST /v1/responses/input_tokens` counts tokens
for any account, it names no response. Paths compare case-sensitively, as
the API does; a trailing slash is not the API's and falls to OTHER.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class RouteKind(StrEnum):
    BRIDGED = "bridged"
    WEBSOCKET = "websocket"
    COMPACT = "compact"
    ONE_RESPONSE = "one_response"
    MODELS = "models"
    OTHER = "other"


@dataclass(frozen=True)
class Route:
    kind: RouteKind
    # ONE_RESPONSE: the response the request reads or controls.
    response_id: str | None = None


# Names under `/responses/` that are endpoints, not response ids.
_NOT_IDS = frozenset({"compact", "input_tokens"})
_ONE_RESPONSE_ACTIONS = {("GET", "input_items"), ("POST", "cancel")}


def route(method: str, path: str, *, websocket: bool = False) -> Route:
    """The route of a request; `path` may carry a query, `websocket`: it asks to upgrade."""
    parts = path.split("?", 1)[0].split("/")
    if parts[-1] == "responses":
        if method == "POST" and not websocket:
            return Route(RouteKind.BRIDGED)
        if method == "GET" and websocket:
            return Route(RouteKind.WEBSOCKET)
        return Route(RouteKind.OTHER)
    if websocket:
        return Route(RouteKind.OTHER)
    if len(parts) >= 3 and parts[-2] == "responses":
        return _under_responses(method, parts[-1])
    if len(parts) >= 4 and parts[-3] == "responses":
        response_id, action = parts[-2], parts[-1]
        if (
            response_id
            and response_id not in _NOT_IDS
            and (method, action) in (_ONE_RESPONSE_ACTIONS)
        ):
            return Route(RouteKind.ONE_RESPONSE, response_id)
        return Route(RouteKind.OTHER)
    if method == "GET" and (
        parts[-1] == "models" or (len(parts) >= 3 and parts[-2] == "models" and parts[-1])
    ):
        return Route(RouteKind.MODELS)
    return Route(RouteKind.OTHER)


def _under_responses(method: str, name: str) -> Route:
    if name == "compact":
        return Route(RouteKind.COMPACT if method == "POST" else RouteKind.OTHER)
    if name and name not in _NOT_IDS and method in ("GET", "DELETE"):
        return Route(RouteKind.ONE_RESPONSE, name)
    return Route(RouteKind.OTHER)
