"""The local Responses WebSocket upstream, driven by the real websockets client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from openai.types.responses import Response
from openai.types.responses.responses_server_event import ResponsesServerEvent
from pydantic import TypeAdapter
from responses_ws_bridge.local.response_events import (
    DEFAULT_TEXT,
    TurnSpec,
    error_event,
    rate_limit_event,
)
from responses_ws_bridge.local.upstream import (
    ConnectionRecord,
    LocalUpstream,
    Plan,
    ThreadedUpstream,
    bearer_token,
    check_message,
    describe,
    previous_response_error,
)
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, InvalidStatus
from websockets.sync.client import connect as sync_connect

from tests.support.data import ROOT, load_capture

SERVER_EVENT: TypeAdapter[Any] = TypeAdapter(ResponsesServerEvent)
TERMINAL = {"response.completed", "response.failed", "response.incomplete", "error"}
TOKENS = {"tok-a": "team-a", "tok-b": "team-b"}
TIMEOUT = 10.0


def run(body: Callable[[LocalUpstream], Awaitable[None]], **options: Any) -> list[ConnectionRecord]:
    """Runs `body` against a started upstream; returns its records after it stopped."""
    upstream = LocalUpstream(**options)

    async def main() -> None:
        async with asyncio.timeout(3 * TIMEOUT):
            async with upstream:
                async with asyncio.timeout(TIMEOUT):
                    await body(upstream)

    asyncio.run(main())
    return upstream.records()


def create(**fields: Any) -> str:
    return json.dumps({"type": "response.create", "model": "gpt-5-codex", "input": "hi", **fields})


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def read_turn(ws: ClientConnection) -> list[dict[str, Any]]:
    """Events up to and including the terminal one."""
    events: list[dict[str, Any]] = []
    while not events or events[-1]["type"] not in TERMINAL:
        events.append(json.loads(await ws.recv()))
    return events


async def read_until_closed(ws: ClientConnection) -> tuple[list[dict[str, Any]], ConnectionClosed]:
    events: list[dict[str, Any]] = []
    while True:
        try:
            events.append(json.loads(await ws.recv()))
        except ConnectionClosed as exc:
            return events, exc


def all_ended(records: list[ConnectionRecord]) -> bool:
    return bool(records) and all(record.ended for record in records)


# -- pure parts -------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer  abc ", "abc"),
        ("Basic abc", None),
        ("Bearer", None),
        ("", None),
        (None, None),
    ],
)
def test_bearer_token(value: str | None, token: str | None) -> None:
    assert bearer_token(value) == token


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("not json", "invalid_request_error"),
        ("[1, 2]", "invalid_request_error"),
        ('{"type": "response.cancel"}', "unknown_event_type"),
        ('{"model": "m"}', "unknown_event_type"),
        ('{"type": "response.create"}', "missing_required_parameter"),
        ('{"type": "response.create", "model": "m"}', None),
    ],
)
def test_check_message(raw: str, code: str | None) -> None:
    request, problem = check_message(raw)
    if code is None:
        assert problem is None
        assert request == json.loads(raw)
    else:
        assert request is None
        assert problem is not None
        assert (problem["type"], problem["status"], problem["error"]["code"]) == (
            "error",
            400,
            code,
        )


@pytest.mark.parametrize(
    ("previous", "owners", "account", "found"),
    [
        (None, {}, None, True),
        ("resp_1", {"resp_1": "team-a"}, "team-a", True),
        ("resp_1", {"resp_1": "team-a"}, "team-b", False),
        ("resp_1", {"resp_1": None}, None, True),
        ("resp_1", {}, None, False),
    ],
)
def test_previous_response_error(
    previous: str | None, owners: dict[str, str | None], account: str | None, found: bool
) -> None:
    request = {"previous_response_id": previous} if previous else {}
    problem = previous_response_error(request, owners, account)
    if found:
        assert problem is None
    else:
        assert problem is not None
        assert problem["error"]["code"] == "previous_response_not_found"


def test_plan_takes_one_failure_at_most() -> None:
    with pytest.raises(ValueError):
        Plan(close_code=1011, hang=True)
    with pytest.raises(ValueError):
        Plan(drop_after_events=1, error=rate_limit_event())
    assert Plan(close_code=1011).reason == "internal error"
    assert Plan(close_code=1000).reason == ""


# -- turns ------------------------------------------------------------------


def test_full_turn_and_its_record() -> None:
    capture = load_capture("websocket.json")
    # The identity headers Codex sent, in its order; websockets writes the framing ones.
    framing = {"host", "connection", "upgrade", "sec-websocket-version", "sec-websocket-key"}
    sent_headers = [(k, v) for k, v in capture["headers"] if k.lower() not in framing]
    sent_headers = [(k, v) for k, v in sent_headers if k.lower() != "sec-websocket-extensions"]
    received: list[dict[str, Any]] = []

    async def body(upstream: LocalUpstream) -> None:
        url = upstream.url + "/backend-api/codex/responses"
        async with connect(url, additional_headers=sent_headers, user_agent_header=None) as ws:
            await ws.send(create(store=False))
            received.extend(await read_turn(ws))
        await upstream.wait_until(all_ended, TIMEOUT)

    (record,) = run(body)
    types = [event["type"] for event in received]
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert set(types[4:-4]) == {"response.output_text.delta"}
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [event["sequence_number"] for event in received] == list(range(len(received)))
    for event in received:
        SERVER_EVENT.validate_python(event)
    response = Response.model_validate(received[-1]["response"])
    assert response.output_text == DEFAULT_TEXT
    assert response.id.startswith("resp_") and len(response.id) == 37
    assert received[-1]["response"]["store"] is False

    assert record.path == "/backend-api/codex/responses"
    assert record.status == 101 and not record.rejected
    names = [name for name, _ in record.headers]
    assert [h for h in record.headers if h[0] in dict(sent_headers)] == sent_headers
    assert names[:2] == ["Host", "Upgrade"]
    assert record.account is None
    assert [m.data for m in record.messages] == [json.loads(create(store=False))]
    assert [sent.event for sent in record.events] == received
    assert record.response_ids == [response.id]
    assert (record.closed_by, record.close_code) == ("client", 1000)


def test_two_turns_on_one_socket_chain_with_previous_response_id() -> None:
    async def body(upstream: LocalUpstream) -> None:
        async with connect(upstream.url + "/v1/responses") as ws:
            await ws.send(create())
            first = (await read_turn(ws))[-1]["response"]
            await ws.send(create(previous_response_id=first["id"], input="more"))
            second = (await read_turn(ws))[-1]
            assert second["type"] == "response.completed"
            assert second["response"]["previous_response_id"] == first["id"]
            assert second["response"]["id"] != first["id"]
            assert second["sequence_number"] == 12
        await upstream.wait_until(all_ended, TIMEOUT)

    (record,) = run(body)
    assert len(record.response_ids) == 2
    assert len(record.messages) == 2


def test_codex_prewarm_then_turn_from_the_capture() -> None:
    capture = load_capture("websocket.json")
    prewarm, turn = capture["messages"]

    async def body(upstream: LocalUpstream) -> None:
        async with connect(upstream.url + "/v1/responses") as ws:
            await ws.send(json.dumps(prewarm))
            answer = await read_turn(ws)
            assert [e["type"] for e in answer] == capture["server_answer_event_types"][0]
            follow_up = dict(turn, previous_response_id=answer[-1]["response"]["id"])
            await ws.send(json.dumps(follow_up))
            answer = await read_turn(ws)
            assert [e["type"] for e in answer] == capture["server_answer_event_types"][1]

    run(body, default_plan=Plan(turn=TurnSpec(deltas=3)))


def test_unknown_previous_response_id_is_an_error_event_and_the_socket_stays_open() -> None:
    async def body(upstream: LocalUpstream) -> None:
        async with connect(upstream.url + "/v1/responses") as ws:
            await ws.send(create(previous_response_id="resp_unknown"))
            (event,) = await read_turn(ws)
            assert event["type"] == "error"
            assert event["status"] == 400
            assert event["error"]["code"] == "previous_response_not_found"
            assert event["error"]["param"] == "previous_response_id"
            await ws.send(create())
            assert (await read_turn(ws))[-1]["type"] == "response.completed"

    run(body)


def test_previous_response_id_belongs_to_its_account() -> None:
    async def body(upstream: LocalUpstream) -> None:
        url = upstream.url + "/v1/responses"
        async with connect(url, additional_headers=auth("tok-a")) as ws:
            await ws.send(create())
            produced = (await read_turn(ws))[-1]["response"]["id"]
        assert upstream.owner_of(produced) == "team-a"
        # Another account: not found; the same account on a new socket: found.
        async with connect(url, additional_headers=auth("tok-b")) as ws:
            await ws.send(create(previous_response_id=produced))
            assert (await read_turn(ws))[-1]["error"]["code"] == "previous_response_not_found"
        async with connect(url, additional_headers=auth("tok-a")) as ws:
            await ws.send(create(previous_response_id=produced))
            assert (await read_turn(ws))[-1]["type"] == "response.completed"

    run(body, tokens=TOKENS)


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ("not json", "invalid_request_error"),
        ('["response.create"]', "invalid_request_error"),
        ('{"type": "session.update"}', "unknown_event_type"),
    ],
)
def test_invalid_message_is_an_error_event_and_the_socket_stays_open(
    message: str, code: str
) -> None:
    async def body(upstream: LocalUpstream) -> None:
        async with connect(upstream.url + "/v1/responses") as ws:
            await ws.send(message)
            (event,) = await read_turn(ws)
            assert (event["type"], event["status"], event["error"]["code"]) == ("error", 400, code)
            await ws.send(create())
            assert (await read_turn(ws))[-1]["type"] == "response.completed"
        await upstream.wait_until(all_ended, TIMEOUT)

    (record,) = run(body)
    assert record.messages[0].raw == message
    assert record.event_types[0] == "error"


def test_flood_of_deltas_with_send_time_stamps() -> None:
    async def body(upstream: LocalUpstream) -> None:
        async with connect(upstream.url + "/v1/responses") as ws:
            await ws.send(create())
            events = await read_turn(ws)
        deltas = [e for e in events if e["type"] == "response.output_text.delta"]
        assert len(deltas) == 2000
        assert [e["sequence_number"] for e in events] == list(range(len(events)))
        stamps = [e["x_sent_ns"] for e in events]
        assert stamps == sorted(stamps)
        text = Response.model_validate(events[-1]["response"]).output_text
        assert text == "".join(e["delta"] for e in deltas)

    run(body, default_plan=Plan(turn=TurnSpec(deltas=2000, stamp_ns=True)))


# -- plans --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("plan", "status", "code", "headers"),
    [
        (Plan(reject_status=401), 401, "invalid_api_key", {}),
        (
            Plan(
                reject_status=429,
                reject_body={"error": {"message": "slow", "type": "requests", "code": "rl"}},
                reject_headers={"Retry-After": "7"},
            ),
            429,
            "rl",
            {"Retry-After": "7"},
        ),
        (Plan(reject_status=503), 503, "server_error", {}),
    ],
)
def test_rejected_handshake(plan: Plan, status: int, code: str, headers: dict[str, str]) -> None:
    async def body(upstream: LocalUpstream) -> None:
        upstream.script(plan)
        with pytest.raises(InvalidStatus) as caught:
            await connect(upstream.url + "/v1/responses")
        response = caught.value.response
        assert response.status_code == status
        assert json.loads(response.body)["error"]["code"] == code
        assert response.headers["Content-Type"] == "application/json"
        for name, value in headers.items():
            assert response.headers[name] == value
        # The plan is used up: the next connection is served.
        async with connect(upstream.url + "/v1/responses") as ws:
            await ws.send(create())
            assert (await read_turn(ws))[-1]["type"] == "response.completed"
        await upstream.wait_until(all_ended, TIMEOUT)

    rejected, served = run(body)
    assert (rejected.status, rejected.rejected, rejected.closed_by) == (status, True, "server")
    assert rejected.plan == plan
    assert (served.status, served.rejected) == (101, False)


def test_close_1011_before_response_created() -> None:
    async def body(upstream: LocalUpstream) -> None:
        upstream.script(Plan(close_code=1011))
        async with connect(upstream.url + "/v1/responses") as ws:
            await ws.send(create())
            events, closed = await read_until_closed(ws)
        assert events == []
        assert isinstance(closed, ConnectionClosedError)
        assert closed.rcvd is not None
        assert (closed.rcvd.code, closed.rcvd.reason) == (1011, "internal error")
        await upstream.wait_until(all_ended, TIMEOUT)

    (record,) = run(body)
    assert (record.closed_by, record.close_code, record.close_reason) == (
        "server",
        1011,
        "internal error",
    )
    assert record.events == []


@pytest.mark.parametrize("count", [1, 3, 13])
def test_close_after_some_events(count: int) -> None:
    async def body(upstream: LocalUpstream) -> None:
        upstream.script(Plan(close_code=1012, close_reason="restart", close_after_events=count))
        async with connect(upstream.url + "/v1/responses") as ws:
            await ws.send(create())
            events, closed = await read_until_closed(ws)
        assert len(events) == count
        assert events[0]["type"] == "response.created"
        assert closed.rcvd is not None
        assert (closed.rcvd.code, closed.rcvd.reason) == (1012, "restart")

    (record,) = run(body)
    assert (record.closed_by, record.close_code) == ("server", 1012)
    assert len(record.events) == count


@pytest.mark.parametrize("count", [0, 2])
def test_drop_without_close_frame(count: int) -> None:
    async def body(upstream: LocalUpstream) -> None:
        upstream.script(Plan(drop_after_events=count))
        async with connect(upstream.url + "/v1/responses") as ws:
            await ws.send(create())
            events, closed = await read_until_closed(ws)
            assert ws.close_code == 1006
        assert len(events) == count
        assert isinstance(closed, ConnectionClosedError)
        assert closed.rcvd is None and closed.sent is None
        await upstream.wait_until(all_ended, TIMEOUT)

    (record,) = run(body)
    assert (record.closed_by, record.close_code) == ("abrupt", 1006)
    assert len(record.events) == count


def test_error_event_plan_answers_the_first_create_only() -> None:
    error = rate_limit_event(5)

    async def body(upstream: LocalUpstream) -> None:
        upstream.script(Plan(error=error))
        async with connect(upstream.url + "/v1/responses") as ws:
            await ws.send(create())
            assert await read_turn(ws) == [error]
            await ws.send(create())
            assert (await read_turn(ws))[-1]["type"] == "response.completed"

    run(body)


def test_turn_state_header_on_the_101() -> None:
    async def body(upstream: LocalUpstream) -> None:
        upstream.script(Plan(turn_state="ts-123"))
        async with connect(upstream.url + "/v1/responses") as ws:
            assert ws.response is not None
            assert ws.response.headers["x-codex-turn-state"] == "ts-123"
        async with connect(upstream.url + "/v1/responses") as ws:
            assert ws.response is not None
            assert "x-codex-turn-state" not in ws.response.headers

    run(body)


def test_hang_answers_nothing_and_records_the_client_hanging_up() -> None:
    async def body(upstream: LocalUpstream) -> None:
        upstream.script(Plan(hang=True))
        async with connect(upstream.url + "/v1/responses") as ws:
            await ws.send(create())
            # Messages are handled in order: the first answer is to the second one.
            await ws.send("not json")
            (event,) = await read_turn(ws)
            assert event["error"]["code"] == "invalid_request_error"
            await ws.close(4000, "gave up")
        records = await upstream.wait_until(all_ended, TIMEOUT)
        assert records[0].closed_by == "client"

    (record,) = run(body)
    assert len(record.messages) == 2
    assert record.event_types == ["error"]
    assert (record.closed_by, record.close_code, record.close_reason) == ("client", 4000, "gave up")


def test_client_closing_mid_turn_stops_the_turn_at_once() -> None:
    # A minute between events: only an interrupted pause fits in the test timeout.
    plan = Plan(turn=TurnSpec(deltas=50), pace_s=60.0)

    async def body(upstream: LocalUpstream) -> None:
        async with connect(upstream.url + "/v1/responses") as ws:
            await ws.send(create())
            assert json.loads(await ws.recv())["type"] == "response.created"
            await ws.close(1001, "client leaving")
        await upstream.wait_until(all_ended, TIMEOUT)

    (record,) = run(body, default_plan=plan)
    assert (record.closed_by, record.close_code, record.close_reason) == (
        "client",
        1001,
        "client leaving",
    )
    assert record.event_types == ["response.created"]


def test_client_vanishing_mid_turn_is_recorded_as_abrupt() -> None:
    plan = Plan(turn=TurnSpec(deltas=50), pace_s=60.0)

    async def body(upstream: LocalUpstream) -> None:
        ws = await connect(upstream.url + "/v1/responses")
        await ws.send(create())
        assert json.loads(await ws.recv())["type"] == "response.created"
        ws.transport.abort()
        await ws.wait_closed()
        await upstream.wait_until(all_ended, TIMEOUT)

    (record,) = run(body, default_plan=plan)
    assert (record.closed_by, record.close_code) == ("abrupt", 1006)
    assert record.event_types == ["response.created"]


def test_server_stop_closes_open_connections_with_1001() -> None:
    held: list[ClientConnection] = []

    async def body(upstream: LocalUpstream) -> None:
        ws = await connect(upstream.url + "/v1/responses")
        held.append(ws)
        await ws.send(create())
        await read_turn(ws)

    (record,) = run(body)
    assert held[0].close_code == 1001
    assert (record.closed_by, record.close_code) == ("server", 1001)


# -- accounts and scripting ---------------------------------------------------


def test_tokens_map_to_accounts_and_unknown_tokens_get_401() -> None:
    async def body(upstream: LocalUpstream) -> None:
        url = upstream.url + "/v1/responses"
        async with connect(url, additional_headers=auth("tok-b")) as ws:
            await ws.send(create())
            await read_turn(ws)
        for headers in (auth("nope"), {}):
            with pytest.raises(InvalidStatus) as caught:
                await connect(url, additional_headers=headers)
            assert caught.value.response.status_code == 401
            error = json.loads(caught.value.response.body)["error"]
            assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_api_key")
            assert error["message"]
        await upstream.wait_until(lambda rs: len(rs) == 3 and all_ended(rs), TIMEOUT)

    served, wrong, missing = run(body, tokens=TOKENS)
    assert (served.account, served.status) == ("team-b", 101)
    assert (wrong.account, wrong.status, missing.status) == (None, 401, 401)


def test_plans_queued_for_an_account_wait_for_that_account() -> None:
    async def body(upstream: LocalUpstream) -> None:
        url = upstream.url + "/v1/responses"
        upstream.script(Plan(reject_status=429), account="team-b")
        upstream.script(Plan(turn_state="any-1"))
        async with connect(url, additional_headers=auth("tok-a")) as ws:
            assert ws.response is not None
            assert ws.response.headers["x-codex-turn-state"] == "any-1"
        async with connect(url, additional_headers=auth("tok-a")) as ws:
            assert ws.response is not None
            assert "x-codex-turn-state" not in ws.response.headers
        with pytest.raises(InvalidStatus) as caught:
            await connect(url, additional_headers=auth("tok-b"))
        assert caught.value.response.status_code == 429
        assert upstream.pending_plans() == 0

    records = run(body, tokens=TOKENS)
    assert [r.status for r in records] == [101, 101, 429]


def test_records_are_snapshots_and_filter_by_account() -> None:
    async def body(upstream: LocalUpstream) -> None:
        url = upstream.url + "/v1/responses"
        async with connect(url, additional_headers=auth("tok-a")) as ws:
            await ws.send(create())
            await read_turn(ws)
            before = upstream.records()
            await ws.send(create())
            await read_turn(ws)
        async with connect(url, additional_headers=auth("tok-b")) as ws:
            await ws.send(create())
            await read_turn(ws)
        after = await upstream.wait_until(lambda rs: len(rs) == 2 and all_ended(rs), TIMEOUT)
        (early,) = before
        assert (len(early.messages), early.ended) == (1, False)
        assert len(after[0].messages) == 2
        assert [r.account for r in upstream.records(account="team-a")] == ["team-a"]
        assert [r.account for r in upstream.records(account="team-b")] == ["team-b"]
        assert upstream.records(account="team-c") == []
        assert [r.id for r in after] == [1, 2]
        # Changing a snapshot changes nothing upstream.
        after[0].headers.clear()
        after[0].events.clear()
        assert upstream.records()[0].headers and upstream.records()[0].events

    run(body, tokens=TOKENS)


def test_reset_forgets_plans_and_hides_records_but_not_response_ids() -> None:
    async def body(upstream: LocalUpstream) -> None:
        url = upstream.url + "/v1/responses"
        async with connect(url) as ws:
            await ws.send(create())
            produced = (await read_turn(ws))[-1]["response"]["id"]
        await upstream.wait_until(all_ended, TIMEOUT)
        upstream.script(Plan(reject_status=500))
        upstream.reset()
        assert upstream.records() == []
        assert upstream.pending_plans() == 0
        async with connect(url) as ws:
            await ws.send(create(previous_response_id=produced))
            assert (await read_turn(ws))[-1]["type"] == "response.completed"
        (record,) = await upstream.wait_until(all_ended, TIMEOUT)
        assert record.id == 2

    run(body)


# -- plain HTTP -----------------------------------------------------------------


def test_plain_http_requests() -> None:
    async def body(upstream: LocalUpstream) -> None:
        async with httpx.AsyncClient(base_url=upstream.http_url) as client:
            models = await client.get("/v1/models")
            assert models.status_code == 200
            assert models.json()["object"] == "list"
            assert models.json()["data"][0]["id"] == "gpt-5-codex"
            not_upgraded = await client.get("/v1/responses")
            assert not_upgraded.status_code == 426
            assert not_upgraded.json()["error"]["code"] == "upgrade_required"
            assert not_upgraded.headers["upgrade"] == "websocket"
            missing = await client.get("/v1/files")
            assert missing.status_code == 404
            assert set(missing.json()["error"]) >= {"message", "type", "code"}
        with pytest.raises(InvalidStatus) as caught:
            await connect(upstream.url + "/v1/chat/completions")
        assert caught.value.response.status_code == 404
        assert json.loads(caught.value.response.body)["error"]["code"] == "not_found"

    records = run(body)
    assert [r.status for r in records] == [200, 426, 404, 404]
    assert all(r.closed_by == "server" for r in records)


# -- the threaded server and the command line ----------------------------------


def test_threaded_upstream_serves_synchronous_clients_and_stops_in_bounded_time() -> None:
    upstream = ThreadedUpstream(tokens=TOKENS)
    url = ""
    with contextlib.ExitStack() as clients:
        with upstream:
            assert upstream.running
            url = upstream.url + "/v1/responses"
            with sync_connect(url, additional_headers=auth("tok-a"), open_timeout=TIMEOUT) as ws:
                ws.send(create())
                events: list[dict[str, Any]] = []
                while not events or events[-1]["type"] not in TERMINAL:
                    events.append(json.loads(ws.recv(timeout=TIMEOUT)))
            records = upstream.wait_for(lambda rs: len(rs) == 1 and all_ended(rs), TIMEOUT)
            assert records[0].account == "team-a"
            # This one hangs, and is still open when the server stops.
            upstream.script(Plan(hang=True))
            hanging = clients.enter_context(
                sync_connect(url, additional_headers=auth("tok-a"), open_timeout=TIMEOUT)
            )
            hanging.send(create())
            upstream.wait_for(lambda rs: len(rs) == 2 and len(rs[1].messages) == 1, TIMEOUT)
        assert not upstream.running
        with pytest.raises(ConnectionClosed):
            hanging.recv(timeout=TIMEOUT)
        assert hanging.close_code == 1001
    assert upstream.records()[1].closed_by == "server"
    with pytest.raises(TimeoutError):
        upstream.wait_for(lambda rs: len(rs) > 5, 0.01)
    # Stopped for good: nothing listens on the port any more.
    with pytest.raises(OSError):
        sync_connect(url, open_timeout=TIMEOUT).close()


def test_command_line_prints_one_line_per_handshake() -> None:
    lines: queue.Queue[str] = queue.Queue()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "responses_ws_bridge.local.upstream",
            "--port",
            "0",
            "--text",
            "hi there",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line.rstrip("\n"))

    threading.Thread(target=pump, daemon=True).start()
    try:
        banner = lines.get(timeout=TIMEOUT)
        assert banner.startswith("local Responses upstream on ws://127.0.0.1:")
        url = banner.rsplit(" ", 1)[1]
        with sync_connect(url, additional_headers={"session-id": "s-1"}) as ws:
            ws.send(create())
            events: list[dict[str, Any]] = []
            while not events or events[-1]["type"] not in TERMINAL:
                events.append(json.loads(ws.recv(timeout=TIMEOUT)))
        assert Response.model_validate(events[-1]["response"]).output_text == "hi there"
        handshake = lines.get(timeout=TIMEOUT)
        assert "101 /v1/responses account=-" in handshake
        assert "session-id" in handshake
        assert "closed by client code=1000" in lines.get(timeout=TIMEOUT)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=TIMEOUT) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=TIMEOUT)


def test_describe() -> None:
    record = ConnectionRecord(
        id=3,
        path="/v1/responses",
        headers=[("Host", "x"), ("session-id", "s")],
        account="team-a",
        opened_at=0.0,
        status=101,
    )
    assert describe(record) == "#3 101 /v1/responses account=team-a headers: Host, session-id"


def test_error_event_helper_is_what_the_error_plan_sends() -> None:
    custom = error_event(500, "server_error", "boom", type_="server_error")

    async def body(upstream: LocalUpstream) -> None:
        upstream.script(Plan(error=custom))
        async with connect(upstream.url + "/v1/responses") as ws:
            await ws.send(create())
            assert await read_turn(ws) == [custom]

    run(body)
