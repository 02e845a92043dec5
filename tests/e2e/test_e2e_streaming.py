"""End to end: answers stream from inside mitmproxy, HTTP/1.1 and HTTP/2, at the client's pace."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from harness.fixture_replay import client_flows
from harness.proxy_process import ProxyProcess
from mitmproxy import http as mitm_http
from responses_ws_bridge.addons.flow_streaming import PIECE, UNSENT_LIMIT
from responses_ws_bridge.local.ports import free_port
from responses_ws_bridge.local.response_events import TurnSpec
from responses_ws_bridge.local.tls import TestPki, make_test_pki
from responses_ws_bridge.local.upstream import Plan, ThreadedUpstream

from tests.support.h2_client import H2Client
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
    flow = the_client_flow(saved)
    assert flow.request.content == body
    assert flow.request.headers["content-length"] == str(len(body))
    # The reverse-mode target: the flow was never pointed anywhere else.
    assert flow.request.url == f"http://127.0.0.1:{upstream.port}/v1/responses"
    assert flow.response is not None and json.loads(flow.response.content or b"")["status"]


def test_a_client_that_leaves_keeps_what_it_got_on_its_flow_when_streamed_bodies_are_stored(
    upstream: ThreadedUpstream, tmp_path: Path
) -> None:
    saved = tmp_path / "flows.mitm"
    with ProxyProcess(
        "--mode",
        f"reverse:http://127.0.0.1:{upstream.port}",
        "--set",
        "connection_strategy=lazy",
        "--set",
        "store_streamed_bodies=true",
        "-w",
        str(saved),
    ) as proxy:
        upstream.script(Plan(turn=TurnSpec(deltas=DELTAS), pace_s=0.01))
        got = b""
        with client() as http, http.stream("POST", f"{proxy.url}/v1/responses", json=BODY) as r:
            for chunk in r.iter_bytes():
                got += chunk
                if got.count(b"response.output_text.delta") >= 3:
                    break  # leaves: the connection closes with the stream
        deadline = time.monotonic() + 10
        while "client_gone" not in proxy.log() and time.monotonic() < deadline:
            time.sleep(0.02)
        proxy.stop()  # flushes the -w file
    flow = the_client_flow(saved)
    assert flow.error is not None and flow.response is not None
    kept = flow.response.content or b""
    # What went out before the client left: at least what it read, and never a whole turn.
    assert kept.startswith(got) and b"response.completed" not in kept
    assert flow.metadata["responses_bridge"]["outcome"] == "client_gone"


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


# An upstream that floods: deltas of 8 KiB back to back. FLOOD is a whole turn
# (4 MiB of deltas, then the text again in the closing events), far more than
# the bridge may hold for a client; ENDLESS offers 64 MiB of deltas (and then
# falls silent), more than every buffer between the upstream and the client.
WORD = "y" * 8191 + " "
FLOOD_DELTAS = 512
FLOOD = Plan(turn=TurnSpec(text=WORD, deltas=FLOOD_DELTAS, completed_output=False))
ENDLESS_EVENTS = 4 + 8192
ENDLESS = Plan(turn=TurnSpec(text=WORD, deltas=8192), stall_after_events=ENDLESS_EVENTS)
HELD_AT_MOST = UNSENT_LIMIT + PIECE
# What a client does while the test waits: called with the time to return by.
Meanwhile = Callable[[float], object]


def stalled(upstream: ThreadedUpstream, meanwhile: Meanwhile, deadline: float) -> int:
    """Waits until the upstream sent its last event or nothing new for a second, calling
    `meanwhile(until)` in between: what the bridge does while its client reads nothing.
    Returns the events the upstream sent."""
    sent, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        records = upstream.records()
        events = records[0].events if records else []
        if events and events[-1].event["type"] == "response.completed":
            return len(events)
        if len(events) != sent:
            sent, since = len(events), time.monotonic()
        elif time.monotonic() - since >= 1.0:
            return sent
        meanwhile(min(deadline, time.monotonic() + 0.05))
    return sent


def reading_frames(h2: H2Client) -> Meanwhile:
    """An HTTP/2 client that reads every frame but takes none of the data (no WINDOW_UPDATE)."""
    return lambda until: h2.pump(lambda: False, until)


def reading_nothing(until: float) -> None:
    time.sleep(max(0.0, until - time.monotonic()))


@contextmanager
def h2_through_the_proxy(
    upstream: ThreadedUpstream, tmp_path: Path, saved: Path
) -> Iterator[H2Client]:
    pki = make_test_pki(tmp_path)
    with (
        tls_origin(pki) as origin,
        ProxyProcess(
            "--set",
            f"bridge_upstream=ws://127.0.0.1:{upstream.port}",
            "--set",
            "ssl_insecure=true",
            "-w",
            str(saved),
        ) as proxy,
    ):
        h2 = H2Client(
            proxy.port, "127.0.0.1", origin, str(Path(proxy.confdir) / "mitmproxy-ca-cert.pem")
        )
        try:
            yield h2
        finally:
            h2.close()


def the_client_flow(saved: Path) -> mitm_http.HTTPFlow:
    (flow,) = client_flows(saved)
    return flow


def test_an_http2_client_that_reads_nothing_holds_the_answer_back(
    upstream: ThreadedUpstream, tmp_path: Path
) -> None:
    saved = tmp_path / "flows.mitm"
    upstream.script(FLOOD)
    with h2_through_the_proxy(upstream, tmp_path, saved) as h2:
        deadline = time.monotonic() + 60
        stream = h2.post("/v1/responses", json.dumps(BODY).encode(), [])
        stalled(upstream, reading_frames(h2), deadline)
        # The proxy sent no more than the client's window (64 KiB) and held the rest back.
        assert h2.status[stream] == 200 and len(h2.body[stream]) <= 65535
        # Now the client reads it all.
        assert h2.pump(lambda: h2.took(stream) and stream in h2.ended, deadline)
    body = bytes(h2.body[stream]).decode()
    types = [line[7:] for line in body.splitlines() if line.startswith("event: ")]
    assert types.count("response.output_text.delta") == FLOOD_DELTAS
    assert types[-1] == "response.completed"
    meta = the_client_flow(saved).metadata["responses_bridge"]
    # The bridge waited for the client, and never held more for it than the bound.
    assert meta["held_up_writes"] > 0
    assert 0 < meta["unsent_peak"] <= HELD_AT_MOST


@pytest.mark.parametrize("leaves", ["reset", "close"])
def test_an_http2_client_that_leaves_while_held_back_ends_the_upstream_turn(
    upstream: ThreadedUpstream, tmp_path: Path, leaves: str
) -> None:
    saved = tmp_path / "flows.mitm"
    upstream.script(ENDLESS)
    with h2_through_the_proxy(upstream, tmp_path, saved) as h2:
        deadline = time.monotonic() + 60
        stream = h2.post("/v1/responses", json.dumps(BODY).encode(), [])
        sent = stalled(upstream, reading_frames(h2), deadline)
        # The upstream's sends were held back too: it could not get rid of its flood.
        assert 4 < sent < ENDLESS_EVENTS
        if leaves == "reset":
            h2.cancel(stream)
        else:
            h2.close()
        # The held-back write lets go at once: the bridge ends the upstream turn.
        (record,) = upstream.wait_for(lambda rs: bool(rs and rs[0].closed_by), 20)
        assert record.closed_by in ("client", "abrupt")
    flow = the_client_flow(saved)
    assert flow.error is not None
    assert flow.metadata["responses_bridge"]["unsent_peak"] <= HELD_AT_MOST


def test_an_http1_client_that_reads_nothing_holds_the_upstream_back(
    reverse_proxy: ProxyProcess, upstream: ThreadedUpstream
) -> None:
    upstream.script(ENDLESS)
    body = json.dumps(BODY).encode()
    head = (
        f"POST /v1/responses HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", reverse_proxy.port), timeout=10) as sock:
        sock.sendall(head + body)
        sent = stalled(upstream, reading_nothing, time.monotonic() + 60)
        # mitmproxy's socket writes wait for the client: the upstream's sends wait too.
        assert 4 < sent < ENDLESS_EVENTS
    (record,) = upstream.wait_for(lambda rs: bool(rs and rs[0].closed_by), 20)
    assert record.closed_by in ("client", "abrupt")
