"""Driving a `BridgeService` in process: one client request in, the HTTP answer out."""

from __future__ import annotations

import json
from typing import Any

import httpx
from responses_ws_bridge.core.affinity import classify
from responses_ws_bridge.core.create_request import parse_create_request
from responses_ws_bridge.core.handshake_headers import UpstreamCredential
from responses_ws_bridge.core.turns import Destination, Turn
from responses_ws_bridge.core.upstream_trust import Endpoint
from responses_ws_bridge.shell.bridge_service import BridgeService
from responses_ws_bridge.shell.sink import ClientGone

from tests.support.sink import RecordingSink

DESTINATION = Destination("http", "127.0.0.1", 1, "/v1/responses")


async def no_sleep(_: float) -> None:
    """The retry backoff, skipped."""


def make_turn(
    body: dict[str, Any],
    headers: list[tuple[str, str]] | None = None,
    *,
    destination: Destination = DESTINATION,
    client_credential: UpstreamCredential | None = None,
    reverse_target: Endpoint | None = None,
    own_endpoints: tuple[Endpoint, ...] = (),
) -> Turn:
    """One request as the addon hands it to the service."""
    raw = json.dumps(body).encode()
    client_headers = tuple(headers or [])
    create = parse_create_request(raw, max_body=1 << 20)
    return Turn(
        flow_id=f"flow-{id(raw)}",
        create=create,
        client_headers=client_headers,
        request_id="req-1",
        destination=destination,
        affinity=classify(client_headers, create.body),
        client_credential=client_credential,
        reverse_target=reverse_target,
        own_endpoints=own_endpoints,
    )


async def post_turn(
    service: BridgeService,
    body: dict[str, Any],
    headers: list[tuple[str, str]] | None = None,
    *,
    destination: Destination = DESTINATION,
    client_credential: UpstreamCredential | None = None,
    reverse_target: Endpoint | None = None,
    own_endpoints: tuple[Endpoint, ...] = (),
    sink: RecordingSink | None = None,
) -> tuple[Turn, httpx.Response]:
    """One request served to a client that reads everything (or `sink`); its answer as read."""
    turn = make_turn(
        body,
        headers,
        destination=destination,
        client_credential=client_credential,
        reverse_target=reverse_target,
        own_endpoints=own_endpoints,
    )
    client = sink or RecordingSink()
    try:
        await service.serve(turn, client)
    except ClientGone:
        # As in the addon: a client that left ends its turn, nothing more to say.
        assert client.gone
    return turn, client.response()
