"""A recorded fixture of flows/ replayed through the bridge, and what differed.

The fixture's upstream sessions are served by the replay server; mitmdump with
the bridge runs in front of it with the fixture's accounts and options
(`flows/fixtures.json`, written by `scripts/make_fixtures.py`); the recorded
client requests are sent again. `differences` says what the client or the
upstream saw that the recording did not: what `make test`
(`tests/e2e/test_replay_fixtures.py`) and `scripts/replay_flows.py` check.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from mitmproxy import http
from mitmproxy import io as mitm_io
from responses_ws_bridge.core.sse import parse_sse
from responses_ws_bridge.recording.replay import (
    ThreadedReplayServer,
    load_exchanges,
    load_sessions,
)
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from harness.oauth_server import FakeTokenEndpoint
from harness.proxy_process import ProxyProcess

ROOT = Path(__file__).resolve().parents[2]
FLOWS = ROOT / "flows"
# Upstream answer headers the client gets (`core.answer_headers`, `core.rate_limits`).
_ANSWER_HEADERS = {"x-reasoning-included", "x-models-etag", "openai-model"}
# What the WebSocket library writes itself on a client's upgrade.
_WS_OWN = {"host", "connection", "upgrade", "sec-websocket-key", "sec-websocket-version"}
_TERMINAL = {"response.completed", "response.failed", "response.incomplete", "error"}


def specs(flows: Path = FLOWS) -> dict[str, dict[str, Any]]:
    """What each fixture needs to replay, by file name."""
    found: dict[str, dict[str, Any]] = json.loads((flows / "fixtures.json").read_text())
    return found


def tokens(spec: dict[str, Any], flows: Path = FLOWS) -> dict[str, str]:
    config = json.loads((flows / spec["accounts"]).read_text())
    found = {a["access_token"]: a["id"] for a in config["accounts"] if "access_token" in a}
    return {**found, **spec["tokens"]}


def client_flows(path: Path) -> list[http.HTTPFlow]:
    """The fixture's client requests, in the order they were sent."""
    with path.open("rb") as f:
        flows = [fl for fl in mitm_io.FlowReader(f).stream() if isinstance(fl, http.HTTPFlow)]
    found = [f for f in flows if f.metadata.get("responses_bridge", {}).get("role") == "client"]
    return sorted(found, key=lambda f: f.request.timestamp_start)


@dataclass
class Replayed:
    fixture: Path
    responses: list[httpx.Response]
    recorded: list[http.HTTPFlow]
    server: ThreadedReplayServer
    # Spent refresh tokens sent to the fake OAuth endpoint again (must be none).
    refresh_reuses: int


def replay(fixture: Path, *extra: str, speed: float | None = None) -> Replayed:
    """Replays one fixture; `extra`: more mitmdump arguments (a seeded bug, say)."""
    flows = fixture.parent
    spec = specs(flows)[fixture.name]
    sessions = load_sessions([fixture])
    recorded = client_flows(fixture)
    with (
        ThreadedReplayServer(
            sessions,
            tokens=tokens(spec, flows),
            message_timeout=5,
            speed=speed,
            exchanges=load_exchanges([fixture]),
        ) as server,
        FakeTokenEndpoint(spec["oauth"] or {}) as oauth,
        tempfile.TemporaryDirectory() as scratch,
    ):
        # A copy: a refreshing bridge writes its token state file beside it.
        accounts = Path(scratch) / spec["accounts"]
        shutil.copy(flows / spec["accounts"], accounts)
        with ProxyProcess(
            "--mode",
            f"reverse:http://127.0.0.1:{server.port}",
            *spec["args"],
            "--set",
            f"bridge_accounts={accounts}",
            "--set",
            f"bridge_oauth_token_url={oauth.url}",
            *extra,
        ) as proxy:
            with httpx.Client(trust_env=False, timeout=30) as client:
                responses = [send(client, proxy.url, flow) for flow in recorded]
            proxy.stop()  # idle sessions close, as they did when recorded
        server.wait_served(len(sessions), 10)
        reuses = oauth.reuses
    return Replayed(fixture, responses, recorded, server, reuses)


def send(client: httpx.Client, base: str, recorded: http.HTTPFlow) -> httpx.Response:
    """The recorded client request again, headers and body as they were."""
    if recorded.websocket is not None:
        return send_websocket(base, recorded)
    headers = [
        (k, v)
        for k, v in recorded.request.headers.items(multi=True)
        if k.lower() not in {"host", "content-length"}
    ]
    return client.request(
        recorded.request.method,
        f"{base}{recorded.request.path}",
        headers=headers,
        content=recorded.request.raw_content or None,
    )


def send_websocket(base: str, recorded: http.HTTPFlow) -> httpx.Response:
    """A recorded WebSocket client again: its upgrade, its messages; what came back, as one
    answer whose body is the server's messages, one JSON per line."""
    headers = [
        (k, v)
        for k, v in recorded.request.headers.items(multi=True)
        if k.lower() not in _WS_OWN and not k.lower().startswith("sec-websocket-")
    ]
    assert recorded.websocket is not None
    sent = [m for m in recorded.websocket.messages if m.from_client]
    got: list[bytes] = []
    url = f"{base.replace('http://', 'ws://')}{recorded.request.path}"
    with ws_connect(
        url, additional_headers=headers, user_agent_header=None, compression=None
    ) as ws:
        for message in sent:
            ws.send(message.text)
            try:
                while True:
                    frame = ws.recv(timeout=10)
                    got.append(frame.encode() if isinstance(frame, str) else frame)
                    if json.loads(frame)["type"] in _TERMINAL:
                        break
            except ConnectionClosed:
                break
    return httpx.Response(101, content=b"\n".join(got))


def server_messages(recorded: http.HTTPFlow) -> list[str]:
    """The types of the messages a recorded WebSocket client got."""
    assert recorded.websocket is not None
    return [json.loads(m.content)["type"] for m in recorded.websocket.messages if not m.from_client]


def differences(replayed: Replayed) -> list[str]:
    """What differed from the recording: the replay's deviations, then each answer's."""
    found = [f"upstream: {d}" for d in replayed.server.deviations]
    sessions = len(replayed.server.server.sessions)
    if not 0 < len(replayed.server.served) == sessions:
        found.append(f"upstream: {len(replayed.server.served)} of {sessions} sessions served")
    server = replayed.server
    if server.exchanges_served != len(server.server.exchanges):
        found.append(
            f"upstream: {server.exchanges_served} of {len(server.server.exchanges)} "
            "forwarded exchanges served"
        )
    if replayed.refresh_reuses:
        found.append(f"a spent refresh token was sent again {replayed.refresh_reuses} times")
    if len(replayed.responses) != len(replayed.recorded):
        found.append("client: not every recorded request was sent")
    for number, (response, flow) in enumerate(
        zip(replayed.responses, replayed.recorded, strict=False), start=1
    ):
        found += [f"client request {number}: {d}" for d in answer_differences(response, flow)]
    return found


def answer_differences(response: httpx.Response, flow: http.HTTPFlow) -> list[str]:
    """How a replayed answer differs from the recorded one (status, headers, content)."""
    recorded = flow.response
    if recorded is None:
        return ["the recording has no answer"]
    if response.status_code != recorded.status_code:
        return [f"status {response.status_code}, recorded {recorded.status_code}"]
    if flow.websocket is not None:
        # A WebSocket client: the messages it got, as the recorded client got them.
        got_types = [json.loads(line)["type"] for line in response.content.splitlines()]
        want_types = server_messages(flow)
        return [] if got_types == want_types else [f"messages {got_types}, recorded {want_types}"]
    got, want = answer_headers(response.headers), answer_headers(recorded.headers)
    found = [f"headers {got}, recorded {want}"] if got != want else []
    if flow.request.path.endswith("/compact"):
        # A forwarded answer is the upstream's, as it was.
        same = response.json() == json.loads(recorded.content or b"")
        return found + ([] if same else ["the forwarded answer differs from the recorded one"])
    return found + _content_differences(response, recorded.content or b"")


def answer_headers(headers: Any) -> list[tuple[str, str]]:
    """Rate-limit families (any `x-…` but the request id) and the 101's passed headers."""
    return sorted(
        (k.lower(), v)
        for k, v in headers.items()
        if (k.lower().startswith("x-") and k.lower() != "x-request-id")
        or k.lower() in _ANSWER_HEADERS
    )


def event_types(body: bytes) -> list[tuple[str | None, str]]:
    """The stream's events; `codex.keepalive` depends on timing and is left out."""
    found = [(t, json.loads(d)["type"]) for t, d in parse_sse(body)]
    return [e for e in found if e[0] != "codex.keepalive"]


def _content_differences(response: httpx.Response, want_body: bytes) -> list[str]:
    if response.headers.get("content-type") == "text/event-stream":
        got, want = event_types(response.content), event_types(want_body)
        return [] if got == want else [f"events {got}, recorded {want}"]
    got_doc, want_doc = response.json(), json.loads(want_body)
    if response.status_code != 200:
        pairs = [(got_doc["error"].get(k), want_doc["error"].get(k)) for k in ("code", "type")]
        return [f"error {g!r}, recorded {w!r}" for g, w in pairs if g != w]
    if "rate_limit" in want_doc:
        return _usage_differences(got_doc, want_doc)
    got_output = [item["content"] for item in got_doc["output"]]
    want_output = [item["content"] for item in want_doc["output"]]
    if not got_output or got_output != want_output:
        return [f"output {got_output}, recorded {want_output}"]
    return []


def _usage_differences(got: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """The pooled usage answer (its reset times follow the clock)."""
    found = []
    if got["rate_limit"]["limit_reached"] != want["rate_limit"]["limit_reached"]:
        found.append("rate_limit.limit_reached differs")
    for window in ("primary_window", "secondary_window"):
        used = [(doc["rate_limit"][window] or {}).get("used_percent") for doc in (got, want)]
        if used[0] != used[1]:
            found.append(f"rate_limit.{window}.used_percent {used[0]}, recorded {used[1]}")
    return found
