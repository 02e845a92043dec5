"""Forwarded requests with a shared store: a response produced through one instance is
read through another on its producer, and a compaction follows the session's owner."""

from __future__ import annotations

import json
from typing import Any

from responses_ws_bridge.core.affinity import Affinity, AffinityKind, classify
from responses_ws_bridge.core.create_request import CreateRequest
from responses_ws_bridge.core.pool_routes import route
from responses_ws_bridge.core.turns import Destination, ForwardedHttp, Turn
from responses_ws_bridge.local.state_server import StateServer

from tests.inprocess.test_shared_service import STREAM, accounts_of, two_instances
from tests.support.sink import RecordingSink
from tests.support.state import run


def forwarded(
    port: int,
    method: str,
    path: str,
    *,
    body: dict[str, Any] | None = None,
    headers: list[tuple[str, str]] | None = None,
    affinity: Affinity | None = None,
) -> Turn:
    client_headers = tuple(headers or ())
    parsed = body or {}
    raw = json.dumps(body).encode() if body else b""
    return Turn(
        flow_id="f",
        create=CreateRequest(False, b"", parsed),
        client_headers=client_headers,
        request_id="req-f",
        destination=Destination("http", "127.0.0.1", port, path),
        affinity=affinity or classify(client_headers, parsed),
        client_credential=None,
        http=ForwardedHttp(route(method, path), method, raw),
    )


def test_a_response_made_through_one_instance_is_read_through_the_other_on_its_producer(
    state_server: StateServer,
) -> None:
    async def main() -> None:
        async with two_instances(state_server) as (upstream, one, two):
            _, made = await one.post({**STREAM, "stream": False})
            response_id = made.json()["id"]
            producer = accounts_of(upstream)[-1]
            upstream.reset()
            affinity = Affinity(AffinityKind.SOFT, owner_hint=response_id)
            sink = RecordingSink()
            turn = forwarded(
                upstream.port, "GET", f"/v1/responses/{response_id}", affinity=affinity
            )
            await two.service.forward(turn, sink)
            assert sink.status == 200 and json.loads(sink.body)["id"] == response_id
            # Straight to its producer, known from the store: no account asked in vain.
            assert accounts_of(upstream) == [producer]

    run(main)


def test_a_compaction_through_the_other_instance_goes_to_the_sessions_owner(
    state_server: StateServer,
) -> None:
    async def main() -> None:
        async with two_instances(state_server) as (upstream, one, two):
            session = [("session-id", "s-compact")]
            _, first = await one.post(STREAM, session)
            assert first.status_code == 200
            owner = accounts_of(upstream)[-1]
            sink = RecordingSink()
            turn = forwarded(
                upstream.port,
                "POST",
                "/v1/responses/compact",
                body={"model": "m", "input": "x"},
                headers=session,
            )
            await two.service.forward(turn, sink)
            assert sink.status == 200
            assert accounts_of(upstream) == [owner, owner]

    run(main)
