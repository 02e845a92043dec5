"""End to end: a hostile client against the bridge's request bodies, encodings and headers.

A real mitmdump with the bridge and an account pool with a client key, in
regular (explicit proxy) mode, attacked over raw sockets: refused requests are
answered from their headers, before their body is read (no `100 Continue`),
and the connection closes; bodies stream through a decoder capped at
`bridge_max_body`; nothing is buffered whole.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness.proxy_process import ProxyProcess
from responses_ws_bridge.local.upstream import ThreadedUpstream

from tests.support.hostile_client import (
    BAD_HEADERS,
    RawResult,
    chunked_flood,
    endless,
    gzip_bomb,
    raw_request,
    request_head,
)

KEY = "hostile-test-client-key"
MAX_BODY = 1024 * 1024
# Far more than the proxy may hold: what it swallows must be dropped, not kept.
FLOOD = 256 * 1024 * 1024
# bridge_upstream is set: the bridge never contacts this host (nor resolves it).
TARGET = "http://attacker.invalid:9000/v1/responses"
UPSTREAM_TOKENS = {"tok-hostile-a": "a"}


@pytest.fixture(scope="module")
def proxy(
    upstream: ThreadedUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    accounts = tmp_path_factory.mktemp("hostile") / "accounts.json"
    accounts.write_text(
        json.dumps({"accounts": [{"id": "a", "api_key": "tok-hostile-a"}], "client_keys": [KEY]})
    )
    with ProxyProcess(
        "--set",
        f"bridge_accounts={accounts}",
        "--set",
        f"bridge_upstream=ws://127.0.0.1:{upstream.port}",
        "--set",
        f"bridge_max_body={MAX_BODY}",
    ) as process:
        yield process


def rss_kib(proxy: ProxyProcess) -> int:
    assert proxy.proc is not None
    for line in Path(f"/proc/{proxy.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def send(
    proxy: ProxyProcess,
    headers: list[tuple[str, str | bytes]],
    body: Iterator[bytes] | bytes = b"",
    *,
    timeout: float = 20.0,
    close_within_s: float = 0.5,
) -> RawResult:
    head = request_head("POST", TARGET, [("host", "attacker.invalid:9000"), *headers])
    pieces = iter([body]) if isinstance(body, bytes) else body
    # A client that asked for 100-continue waits for it (curl: 1 s) before sending.
    expects = any(k.lower() == "expect" for k, _ in headers)
    return raw_request(
        proxy.port,
        head,
        pieces,
        timeout=timeout,
        max_body=FLOOD,
        wait_for_answer_s=2.0 if expects else 0.0,
        close_within_s=close_within_s,
    )


def error_code(result: RawResult) -> str:
    code: str = json.loads(result.body)["error"]["code"]
    return code


AUTH = ("authorization", f"Bearer {KEY}")


@pytest.mark.parametrize(
    ("headers", "body", "status", "code"),
    [
        # A wrong key with a huge announced body and Expect: no 100, a 401, a close.
        pytest.param(
            [
                ("authorization", "Bearer wrong"),
                ("content-length", str(10**12)),
                ("expect", "100-continue"),
            ],
            endless(),
            401,
            "invalid_client_key",
            id="401-content-length-expect",
        ),
        pytest.param(
            [("transfer-encoding", "chunked")],
            chunked_flood(),
            401,
            "invalid_client_key",
            id="401-chunked",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            [AUTH, ("content-length", str(10**12)), ("expect", "100-continue")],
            endless(),
            413,
            "request_too_large",
            id="413-content-length-expect",
        ),
        pytest.param(
            [AUTH, ("content-length", str(10**12))],
            endless(),
            413,
            "request_too_large",
            id="413-content-length",
            marks=pytest.mark.slow,
        ),
        # Chunked: nothing announced, so the cap is enforced while it streams.
        pytest.param(
            [AUTH, ("transfer-encoding", "chunked")],
            chunked_flood(),
            413,
            "request_too_large",
            id="413-chunked",
        ),
    ],
)
def test_refused_unread_and_bounded(
    proxy: ProxyProcess,
    headers: list[tuple[str, str | bytes]],
    body: Iterator[bytes],
    status: int,
    code: str,
) -> None:
    before = rss_kib(proxy)
    result = send(proxy, headers, body, timeout=3.0)
    assert result.status == status, result.received[:300]
    assert b"100 Continue" not in result.received
    assert error_code(result) == code
    # The proxy stops taking the body: it is never read into memory.
    assert result.body_bytes_sent < FLOOD
    assert rss_kib(proxy) - before < 64 * 1024
    if any(k == "expect" for k, _ in headers):
        # A client that waits for the answer sees the connection closed right after it.
        assert result.closed


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ([("authorization", "Bearer wrong"), ("content-length", str(10**12))], 401),
        ([AUTH, ("content-length", str(10**12))], 413),
        ([("authorization", "Bearer wrong"), ("transfer-encoding", "chunked")], 401),
    ],
    ids=["401-content-length", "413-content-length", "401-chunked"],
)
def test_an_early_answer_ends_the_connection_of_a_client_still_sending(
    proxy: ProxyProcess, headers: list[tuple[str, str | bytes]], status: int
) -> None:
    """The answer, then the end of the connection, though the client never stops sending."""
    body = chunked_flood() if ("transfer-encoding", "chunked") in headers else endless()
    result = send(proxy, headers, body, timeout=10.0, close_within_s=10.0)
    assert result.status == status, result.received[:300]
    assert result.closed
    assert result.body_bytes_sent < FLOOD


def test_gzip_bomb_is_stopped_at_the_decoded_cap(proxy: ProxyProcess) -> None:
    bomb = gzip_bomb(128 * 1024 * 1024)
    before = rss_kib(proxy)
    result = send(
        proxy,
        [AUTH, ("content-encoding", "gzip"), ("content-length", str(len(bomb)))],
        bomb,
    )
    assert result.status == 413 and error_code(result) == "request_too_large"
    assert rss_kib(proxy) - before < 64 * 1024


def test_a_good_compressed_body_arrives_whole(
    proxy: ProxyProcess, upstream: ThreadedUpstream
) -> None:
    data = json.dumps({"model": "m", "input": "x" * 50_000}).encode()
    wire = gzip.compress(data)
    result = send(
        proxy, [AUTH, ("content-encoding", "gzip"), ("content-length", str(len(wire)))], wire
    )
    assert result.status == 200, result.received[:300]
    assert json.loads(result.body)["status"] == "completed"
    (record,) = upstream.records()
    assert record.messages[0].data["input"] == "x" * 50_000


@pytest.mark.parametrize(
    ("name", "status"),
    [
        ("non_ascii_request_id", 400),
        ("transfer_encoding_gzip_chunked", 400),
        ("headers_over_16_kib", 431),
        ("control_char_in_session_id", 400),
        ("non_latin1_in_session_id", 400),
    ],
)
def test_bad_headers_get_an_openai_style_answer(
    proxy: ProxyProcess, name: str, status: int
) -> None:
    headers: list[tuple[str, str | bytes]] = [AUTH, ("content-length", "2"), *BAD_HEADERS[name]]
    if name == "transfer_encoding_gzip_chunked":
        headers = [AUTH, *BAD_HEADERS[name]]
    result = send(proxy, headers, b"{}")
    assert result.status == status, result.received[:300]
    assert "error" in json.loads(result.body)


def test_flows_the_bridge_answers_itself_keep_no_client_key(
    upstream: ThreadedUpstream, tmp_path: Path
) -> None:
    saved = tmp_path / "flows.mitm"
    accounts = tmp_path / "accounts.json"
    accounts.write_text(
        json.dumps({"accounts": [{"id": "a", "api_key": "tok-hostile-a"}], "client_keys": [KEY]})
    )
    with ProxyProcess(
        "--set",
        f"bridge_accounts={accounts}",
        "--set",
        f"bridge_upstream=ws://127.0.0.1:{upstream.port}",
        "--set",
        f"bridge_max_body={MAX_BODY}",
        "-w",
        str(saved),
        "-v",
    ) as proxy:
        wrong = ("authorization", "Bearer sk-the-users-own-key-0123456789")
        assert send(proxy, [wrong, ("content-length", "2")], b"{}").status == 401
        assert send(proxy, [AUTH, ("content-length", "4")], b"nope").status == 400
        too_big: list[tuple[str, str | bytes]] = [
            AUTH,
            ("content-length", str(10**9)),
            ("expect", "100-continue"),
        ]
        assert send(proxy, too_big, endless(), timeout=3.0).status == 413
        background = json.dumps({"model": "m", "input": "x", "background": True}).encode()
        assert (
            send(proxy, [AUTH, ("content-length", str(len(background)))], background).status == 400
        )
        log = proxy.log()
    data = saved.read_bytes()
    for secret in (KEY, "sk-the-users-own-key-0123456789"):
        assert secret.encode() not in data
        assert secret not in log
    assert b"<redacted:client>" in data
