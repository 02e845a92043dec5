"""End to end: bridged answers stream from inside mitmproxy, over HTTP/1.1 and HTTP/2."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from harness.proxy_process import ProxyProcess
from mitmproxy import http as mitm_http
from mitmproxy import io as mitm_io
from responses_ws_bridge.local.ports import free_port
from responses_ws_bridge.local.response_events import TurnSpec
from responses_ws_bridge.local.tls import TestPki, make_test_pki
from responses_ws_bridge.local.upstream import Plan, ThreadedUpstream

from tests.support.http import client

BODY = {"model": "m", "input": "x", "stream": True}
DELTAS = 200


def first_event_while_upstream_still_sends(
    http: httpx.Client, url: str, upstream: ThreadedUpstream, http_version: str = "HTTP/1.1"
) -> list[str]:
    """The streamed event types; fails unless the first came before the upstream's last."""
    upstream.script(Plan(turn=TurnSpec(deltas=DELTAS), pace_s=0.01))
    seen_at_first: int | None = None
    body = b""
    with http.stream("POST", url, json=BODY) as response:
        assert response.status_code == 200
        assert response.http_version == http_version
        assert response.headers["content-type"] == "text/event-stream"
        for chunk in response.iter_bytes():
            if seen_at_first is None and b"response.created" in chunk:
                (record,) = upstream.records()
                seen_at_first = len(record.events)
            body += chunk
    assert seen_at_first is not None and seen_at_first < DELTAS
    return [line[7:] for line in body.decode().splitlines() if line.startswith("event: ")]


@pytest.fixture(scope="module")
def reverse_proxy(upstream: ThreadedUpstream) -> Iterator[ProxyProcess]:
    with ProxyProcess(
        "--mode", f"reverse:http://127.0.0.1:{upstream.port}", "--set", "connection_strategy=lazy"
    ) as proxy:
        yield proxy


def test_answers_stream_from_inside_mitmproxy(
    reverse_proxy: ProxyProcess, upstream: ThreadedUpstream
) -> None:
    assert "answers streamed from inside mitmproxy" in reverse_proxy.log()
    with client() as http:
        types = first_event_while_upstream_still_sends(
            http, f"{reverse_proxy.url}/v1/responses", upstream
        )
    assert types[0] == "response.created" and types[-1] == "response.completed"
    assert types.count("response.output_text.delta") == DELTAS


def test_the_saved_flow_shows_the_request_as_sent_and_where_it_went(
    upstream: ThreadedUpstream, tmp_path: Path
) -> None:
    saved = tmp_path / "flows.mitm"
    body = json.dumps({"model": "m", "input": "x" * 39_000}).encode()
    with (
        ProxyProcess(
            "--mode",
            f"reverse:http://127.0.0.1:{upstream.port}",
            "--set",
            "connection_strategy=lazy",
            "-w",
            str(saved),
        ) as proxy,
        client() as http,
    ):
        upstream.script(Plan())
        response = http.post(
            f"{proxy.url}/v1/responses", content=body, headers={"content-type": "application/json"}
        )
        assert response.json()["status"] == "completed"
    with saved.open("rb") as fp:
        flows = [
            f
            for f in mitm_io.FlowReader(fp).stream()
            if isinstance(f, mitm_http.HTTPFlow)
            and f.metadata.get("responses_bridge", {}).get("role") == "client"
        ]
    (flow,) = flows
    assert flow.request.content == body
    assert flow.request.headers["content-length"] == str(len(body))
    # The reverse-mode target: the flow was never pointed anywhere else.
    assert flow.request.url == f"http://127.0.0.1:{upstream.port}/v1/responses"
    assert flow.response is not None and json.loads(flow.response.content or b"")["status"]


@contextmanager
def tls_origin(pki: TestPki) -> Iterator[int]:
    """A TLS server on 127.0.0.1 that negotiates HTTP/2 and never answers anything.

    mitmproxy (default, eager strategy) connects to it first and so offers h2 to
    the client; the bridge answers every request itself, so it is sent none.
    """
    port = free_port()
    ready = threading.Event()
    loop = asyncio.new_event_loop()
    stopped: asyncio.Event | None = None

    async def main() -> None:
        nonlocal stopped
        context = pki.server_context()
        context.set_alpn_protocols(["h2", "http/1.1"])

        async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, ssl.SSLError):
                while await reader.read(65536):
                    pass
            writer.close()

        server = await asyncio.start_server(swallow, "127.0.0.1", port, ssl=context)
        stopped = asyncio.Event()
        ready.set()
        async with server:
            await stopped.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield port
    finally:
        assert stopped is not None
        loop.call_soon_threadsafe(stopped.set)
        thread.join(10)


def test_an_http2_client_gets_streamed_answers_over_tls(
    upstream: ThreadedUpstream, tmp_path: Path
) -> None:
    pki = make_test_pki(tmp_path)
    with (
        tls_origin(pki) as origin,
        ProxyProcess(
            "--set",
            f"bridge_upstream=ws://127.0.0.1:{upstream.port}",
            "--set",
            "ssl_insecure=true",
        ) as proxy,
    ):
        ca = ssl.create_default_context(cafile=str(Path(proxy.confdir) / "mitmproxy-ca-cert.pem"))
        url = f"https://127.0.0.1:{origin}/v1/responses"
        with httpx.Client(
            proxy=proxy.url, verify=ca, http1=False, http2=True, trust_env=False, timeout=20
        ) as http:
            types = first_event_while_upstream_still_sends(http, url, upstream, "HTTP/2")
            upstream.script(Plan())
            response = http.post(url, json={"model": "m", "input": "x"})
    assert response.http_version == "HTTP/2"
    assert response.json()["status"] == "completed"
    assert types[0] == "response.created" and types[-1] == "response.completed"
    assert types.count("response.output_text.delta") == DELTAS
