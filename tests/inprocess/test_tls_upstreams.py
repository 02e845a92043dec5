"""TLS on the local upstreams with a throwaway CA, and the bridge's client trusting (only) it."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from harness.local_sse_upstream import LocalSseUpstream
from responses_ws_bridge.core.failures import AttemptFailed, ConnectFailed
from responses_ws_bridge.local.response_events import TurnSpec, split_text
from responses_ws_bridge.local.tls import TestPki, make_test_pki
from responses_ws_bridge.local.upstream import LocalUpstream, Plan
from responses_ws_bridge.shell.tls_transport import TlsTransport
from responses_ws_bridge.shell.upstream_client import (
    UpstreamSettings,
    open_session,
    tls_context,
)

from tests.support.aio import run_bounded
from tests.support.data import SCRIPTS

TIMEOUT = 15.0
CREATE = json.dumps({"type": "response.create", "model": "m", "input": "hi"})


def run_async(body: Callable[[], Awaitable[Any]]) -> Any:
    return run_bounded(body, TIMEOUT)


def test_the_server_certificate_names_loopback_and_is_signed_by_the_ca(pki: TestPki) -> None:
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    assert server.issuer == ca.subject
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert pki.server_key.stat().st_mode & 0o077 == 0


async def one_turn(url: str, settings: UpstreamSettings) -> list[str]:
    session = await open_session(url, [], settings)
    try:
        await session.send(CREATE)
        types: list[str] = []
        while "response.completed" not in types:
            types += [json.loads(m)["type"] for m in await session.next_batch()]
        return types
    finally:
        await session.close()


def test_the_bridge_client_trusts_the_configured_ca(pki: TestPki) -> None:
    async def body() -> list[str]:
        async with LocalUpstream(ssl_context=pki.server_context()) as upstream:
            assert upstream.url.startswith("wss://127.0.0.1:")
            return await one_turn(
                f"{upstream.url}/v1/responses", UpstreamSettings(trusted_ca=str(pki.ca_cert))
            )

    types = run_async(body)
    assert types[0] == "response.created" and types[-1] == "response.completed"


@pytest.mark.parametrize(
    "settings",
    [
        # The system's CAs do not know the throwaway CA.
        UpstreamSettings(),
        # A configured CA replaces the system's: another CA is not enough either.
        "other",
    ],
)
def test_an_untrusted_certificate_fails_to_connect(
    pki: TestPki, tmp_path: Path, settings: UpstreamSettings | str
) -> None:
    if settings == "other":
        settings = UpstreamSettings(trusted_ca=str(make_test_pki(tmp_path).ca_cert))
    assert isinstance(settings, UpstreamSettings)

    async def body() -> str:
        async with LocalUpstream(ssl_context=pki.server_context()) as upstream:
            with pytest.raises(AttemptFailed) as failed:
                await open_session(f"{upstream.url}/v1/responses", [], settings)
            assert isinstance(failed.value.failure, ConnectFailed)
            return failed.value.failure.detail

    assert "CERTIFICATE_VERIFY_FAILED" in run_async(body)


def test_insecure_skips_verification(pki: TestPki) -> None:
    async def body() -> list[str]:
        async with LocalUpstream(ssl_context=pki.server_context()) as upstream:
            return await one_turn(f"{upstream.url}/v1/responses", UpstreamSettings(insecure=True))

    assert run_async(body)[-1] == "response.completed"


def test_a_missing_ca_file_is_a_connect_failure(tmp_path: Path) -> None:
    settings = UpstreamSettings(trusted_ca=str(tmp_path / "nope.pem"))

    async def body() -> None:
        with pytest.raises(AttemptFailed) as failed:
            await open_session("wss://127.0.0.1:9/v1/responses", [], settings)
        assert isinstance(failed.value.failure, ConnectFailed)
        assert "cannot open" in failed.value.failure.detail

    run_async(body)


def test_tls_contexts_are_built_once_per_configuration(pki: TestPki) -> None:
    assert tls_context(UpstreamSettings()) is None
    one = tls_context(UpstreamSettings(trusted_ca=str(pki.ca_cert)))
    again = tls_context(UpstreamSettings(trusted_ca=str(pki.ca_cert), connect_timeout=3))
    assert one is not None and one is again
    insecure = tls_context(UpstreamSettings(insecure=True))
    assert insecure is not None and insecure.verify_mode is ssl.CERT_NONE
    assert one.verify_mode is ssl.CERT_REQUIRED and one.check_hostname


def test_the_sse_upstream_serves_https(pki: TestPki) -> None:
    async def body() -> list[str]:
        async with LocalSseUpstream(ssl_context=pki.server_context()) as upstream:
            assert upstream.url.startswith("https://")
            async with httpx.AsyncClient(verify=pki.client_context()) as client:
                response = await client.post(
                    f"{upstream.url}/v1/responses",
                    json={"model": "m", "input": "hi", "stream": True},
                )
                return [
                    line.removeprefix("event: ")
                    for line in response.text.splitlines()
                    if line.startswith("event: ")
                ]

    types = run_async(body)
    assert types[0] == "response.created" and types[-1] == "response.completed"


@pytest.mark.parametrize(
    "module",
    [
        "responses_ws_bridge.local.upstream",
        "harness.local_sse_upstream",
    ],
)
def test_the_command_lines_want_both_tls_flags(module: str, pki: TestPki) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", module, "--port", "0", "--tls-cert", str(pki.server_cert)],
        cwd=SCRIPTS,  # where `-m harness.…` is found
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2 and "--tls-cert and --tls-key go together" in proc.stderr


def test_upstream_tls_sockets_keep_no_read_buffer_and_lose_nothing(pki: TestPki) -> None:
    text = "0123456789abcdef" * 8192  # 128 KiB of deltas, frames larger than a TLS record

    async def body() -> tuple[bool, str]:
        plan = Plan(turn=TurnSpec(text=text, deltas=2))
        async with LocalUpstream(ssl_context=pki.server_context(), default_plan=plan) as upstream:
            settings = UpstreamSettings(trusted_ca=str(pki.ca_cert))
            session = await open_session(f"{upstream.url}/v1/responses", [], settings)
            # Our own TLS transport, not asyncio's (its 256 KiB buffer per socket).
            ours = isinstance(session._ws.transport, TlsTransport)
            await session.send(CREATE)
            deltas: list[str] = []
            done = False
            while not done:
                for message in await session.next_batch():
                    event = json.loads(message)
                    if event["type"] == "response.output_text.delta":
                        deltas.append(event["delta"])
                    done = done or event["type"] == "response.completed"
            await session.close()
            return ours, "".join(deltas)

    ours, received = run_async(body)
    assert ours
    assert received == "".join(split_text(text, 2))
