"""End to end: bridged answers stream from inside mitmproxy, over HTTP/1.1 and HTTP/2, or detour."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from responses_ws_bridge.testing.local_upstream import Plan, ThreadedUpstream
from responses_ws_bridge.testing.proxy_process import ProxyProcess
from responses_ws_bridge.testing.response_events import TurnSpec

from tests.support.http import client

BODY = {"model": "m", "input": "x", "stream": True}
DELTAS = 200


def first_event_while_upstream_still_sends(
    http: httpx.Client, url: str, upstream: ThreadedUpstream
) -> list[str]:
    """Reads the stream; True when the first event came before the upstream's last one."""
    upstream.script(Plan(turn=TurnSpec(deltas=DELTAS), pace_s=0.01))
    seen_at_first: int | None = None
    body = b""
    with http.stream("POST", url, json=BODY) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        for chunk in response.iter_bytes():
            if seen_at_first is None and b"response.created" in chunk:
                (record,) = upstream.records()
                seen_at_first = len(record.events)
            body += chunk
    assert seen_at_first is not None and seen_at_first < DELTAS
    return [line[7:] for line in body.decode().splitlines() if line.startswith("event: ")]


@pytest.fixture(scope="module")
def in_proxy(upstream: ThreadedUpstream) -> Iterator[ProxyProcess]:
    with ProxyProcess(
        "--mode", f"reverse:http://127.0.0.1:{upstream.port}", "--set", "connection_strategy=lazy"
    ) as proxy:
        yield proxy


def test_answers_stream_from_inside_mitmproxy(
    in_proxy: ProxyProcess, upstream: ThreadedUpstream
) -> None:
    assert "answers streamed from inside mitmproxy" in in_proxy.log()
    with client() as http:
        types = first_event_while_upstream_still_sends(
            http, f"{in_proxy.url}/v1/responses", upstream
        )
    assert types[0] == "response.created" and types[-1] == "response.completed"
    assert types.count("response.output_text.delta") == DELTAS


def test_the_detour_streams_the_same(upstream: ThreadedUpstream) -> None:
    with (
        ProxyProcess(
            "--mode",
            f"reverse:http://127.0.0.1:{upstream.port}",
            "--set",
            "connection_strategy=lazy",
            "--set",
            "bridge_detour=true",
        ) as proxy,
        client() as http,
    ):
        assert "loopback endpoint on 127.0.0.1" in proxy.log()
        types = first_event_while_upstream_still_sends(http, f"{proxy.url}/v1/responses", upstream)
    assert types[-1] == "response.completed"
