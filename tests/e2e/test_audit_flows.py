"""The flow audit: every unsafe upstream handshake is reported, clean ones pass."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mitmproxy import http
from mitmproxy import io as mitmio
from mitmproxy.test import tflow
from responses_ws_bridge.core.handshake_headers import WEBSOCKET_BETA
from responses_ws_bridge.recording.audit import audit_files, audit_flows
from responses_ws_bridge.recording.session_flows import (
    UpstreamMeta,
    new_exchange_flow,
    new_upstream_flow,
    record_client_attempt,
)

from tests.support.data import ROOT

LIBRARY = [
    ("Host", "chatgpt.com"),
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ("Sec-WebSocket-Version", "13"),
]
SAFE = [("session-id", "s-1"), ("OpenAI-Beta", WEBSOCKET_BETA)]


def bridge_recording(extra: list[tuple[str, str]] | None = None) -> http.HTTPFlow:
    """How this bridge records a handshake (credential redacted)."""
    return new_upstream_flow(
        url="wss://chatgpt.com/backend-api/codex/responses",
        headers=[*LIBRARY, ("Authorization", "Bearer at-secret"), *SAFE, *(extra or [])],
        timestamp=1.0,
        meta=UpstreamMeta("team-a", "hard", "session:s-1", 1),
        client_flow_id=None,
    )


def captured(headers: list[tuple[str, str]]) -> http.HTTPFlow:
    """A handshake of another bridge as `mitmdump -w` saw it, headers verbatim."""
    flow = tflow.twebsocketflow()
    flow.request.headers = http.Headers([(k.encode(), v.encode()) for k, v in headers])
    return flow


def write(path: Path, *flows: http.HTTPFlow) -> str:
    with path.open("wb") as fp:
        writer = mitmio.FlowWriter(fp)
        for f in flows:
            writer.add(f)
    return str(path)


def test_a_clean_recording_passes() -> None:
    client = tflow.tflow(resp=True)
    client.request.headers["cookie"] = "a=1"  # the client's own request: not audited
    upstream = bridge_recording()
    record_client_attempt(client, upstream, outcome="served")
    assert audit_flows([upstream, client, tflow.tflow(resp=True)], "f") == (1, [])
    assert audit_flows([captured([*LIBRARY, *SAFE])], "f") == (1, [])


@pytest.mark.parametrize(
    ("headers", "violation"),
    [
        ([*LIBRARY, *SAFE, ("accept", "text/event-stream")], "accept: an HTTP framing"),
        ([*LIBRARY, *SAFE, ("Cookie", "session=1")], "cookie: an HTTP framing"),
        ([*LIBRARY, *SAFE, ("content-type", "application/json")], "content-type: an HTTP framing"),
        ([*LIBRARY, ("OpenAI-Beta", "responses=experimental")], "responses=experimental"),
        ([*LIBRARY, ("session-id", "s-1")], "openai-beta: missing"),
        ([*LIBRARY, *SAFE, ("authorization", "Bearer sk-proj-abcdefghijkl")], "not redacted"),
        ([*LIBRARY, *SAFE, ("x-debug", "sk-proj-abcdefghijkl")], "x-debug: carries an API key"),
    ],
)
def test_each_unsafe_handshake_is_reported(headers: list[tuple[str, str]], violation: str) -> None:
    flow = captured(headers)
    seen, findings = audit_flows([flow], "capture.mitm")
    assert seen == 1
    assert any(violation in f.violation for f in findings), findings
    assert str(findings[0]).startswith(f"capture.mitm: {flow.id}, ws://example.com/ws: ")


def test_bridge_recordings_are_audited_as_sent() -> None:
    # A recorded cookie keeps its name (its value is redacted): still a violation.
    _, findings = audit_flows([bridge_recording([("cookie", "a=1")])], "f")
    assert [f.violation.split(":")[0] for f in findings] == ["cookie"]
    assert findings[0].url == "wss://chatgpt.com/backend-api/codex/responses"


def test_files_summary_and_unreadable(tmp_path: Path) -> None:
    clean = write(tmp_path / "clean.mitm", bridge_recording())
    dirty = write(tmp_path / "dirty.mitm", captured([*LIBRARY, ("Cookie", "a")]))
    bad = tmp_path / "bad.mitm"
    bad.write_text("not flows")

    assert audit_files([clean]).exit_status == 0
    report = audit_files([clean, dirty])
    assert report.exit_status == 1
    assert report.summary() == "2 WebSocket handshakes in 2 files: 2 violations in 1 handshakes"
    report = audit_files([clean, str(bad), str(tmp_path / "missing.mitm")])
    assert report.exit_status == 2 and len(report.unreadable) == 2


@pytest.mark.parametrize(("dirty", "status"), [(False, 0), (True, 1)])
def test_the_script(tmp_path: Path, dirty: bool, status: int) -> None:
    flows = [bridge_recording()]
    if dirty:
        flows.append(captured([*LIBRARY, ("OpenAI-Beta", "responses=experimental")]))
    path = write(tmp_path / "flows.mitm", *flows)
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "audit_flows.py"), path],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == status, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    if dirty:
        assert lines[0].startswith(f"{path}: {flows[1].id}, ws://example.com/ws: openai-beta: ")
        assert lines[-1].endswith("2 violations in 1 handshakes")
    else:
        assert lines == ["1 WebSocket handshakes in 1 files: no violations"]


def test_forwarded_exchanges_are_no_handshakes_and_the_fixtures_are_clean() -> None:
    exchange = new_exchange_flow(
        url="https://chatgpt.com/backend-api/codex/responses/compact",
        method="POST",
        headers=[("Content-Type", "application/json"), ("Authorization", "Bearer at-x")],
        body=b"{}",
        timestamp=1.0,
        meta=UpstreamMeta("team-a", "hard", "session:s-1", 1),
        client_flow_id=None,
        route="compact",
    )
    assert audit_flows([exchange], "f") == (0, [])
    report = audit_files([str(p) for p in sorted((ROOT / "flows").glob("*.mitm"))])
    assert report.findings == [] and report.handshakes > 0
