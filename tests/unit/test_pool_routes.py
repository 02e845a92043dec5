"""The pool's path table: every request through a pool is one route."""

from __future__ import annotations

import pytest
from responses_ws_bridge.core.pool_routes import Route, RouteKind, route

BRIDGED = Route(RouteKind.BRIDGED)
WEBSOCKET = Route(RouteKind.WEBSOCKET)
COMPACT = Route(RouteKind.COMPACT)
MODELS = Route(RouteKind.MODELS)
OTHER = Route(RouteKind.OTHER)


def one(response_id: str) -> Route:
    return Route(RouteKind.ONE_RESPONSE, response_id)


@pytest.mark.parametrize(
    ("method", "path", "websocket", "expected"),
    [
        # The bridge's own: POST …/responses, both API bases, query aside.
        ("POST", "/v1/responses", False, BRIDGED),
        ("POST", "/backend-api/codex/responses?x=1", False, BRIDGED),
        ("POST", "/v1/responses", True, OTHER),
        ("GET", "/v1/responses", False, OTHER),
        ("PUT", "/v1/responses", False, OTHER),
        ("post", "/v1/responses", False, OTHER),  # methods are case-sensitive
        ("POST", "/v1/responses/", False, OTHER),  # not the API's path
        # A client's WebSocket on …/responses.
        ("GET", "/v1/responses", True, WEBSOCKET),
        ("GET", "/backend-api/codex/responses", True, WEBSOCKET),
        ("GET", "/v1/models", True, OTHER),
        # Compaction, both bases.
        ("POST", "/v1/responses/compact", False, COMPACT),
        ("POST", "/backend-api/codex/responses/compact", False, COMPACT),
        ("GET", "/v1/responses/compact", False, OTHER),
        # One response: reads and controls.
        ("GET", "/v1/responses/resp_1", False, one("resp_1")),
        ("DELETE", "/v1/responses/resp_1", False, one("resp_1")),
        ("GET", "/v1/responses/resp_1?include[]=x", False, one("resp_1")),
        ("GET", "/v1/responses/resp_1/input_items", False, one("resp_1")),
        ("POST", "/v1/responses/resp_1/cancel", False, one("resp_1")),
        ("GET", "/backend-api/codex/responses/resp_2", False, one("resp_2")),
        ("POST", "/v1/responses/resp_1", False, OTHER),
        ("GET", "/v1/responses/resp_1/cancel", False, OTHER),
        ("POST", "/v1/responses/resp_1/input_items", False, OTHER),
        ("GET", "/v1/responses/resp_1/other", False, OTHER),
        ("POST", "/v1/responses/input_tokens", False, OTHER),
        ("GET", "/v1/responses/input_tokens", False, OTHER),
        ("GET", "/v1/responses//input_items", False, OTHER),
        # Models, both bases, one model too.
        ("GET", "/v1/models", False, MODELS),
        ("GET", "/backend-api/codex/models?client_version=0.169.0", False, MODELS),
        ("GET", "/v1/models/gpt-5-codex", False, MODELS),
        ("POST", "/v1/models", False, OTHER),
        ("DELETE", "/v1/models/ft-1", False, OTHER),
        # Everything else a client sends.
        ("POST", "/v1/files", False, OTHER),
        ("GET", "/backend-api/wham/usage", False, OTHER),
        ("GET", "/", False, OTHER),
        ("GET", "", False, OTHER),
    ],
)
def test_route_table(method: str, path: str, websocket: bool, expected: Route) -> None:
    assert route(method, path, websocket=websocket) == expected
