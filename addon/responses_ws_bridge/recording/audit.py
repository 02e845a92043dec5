"""Audit upstream WebSocket handshakes in flow files against the handshake header policy.

Reads any mitmproxy flow file (the bridge's own recordings, or a capture of
another bridge in front of a WebSocket upstream) and finds every WebSocket
handshake that carries a header the bridge must remove, a missing or HTTP-only
`OpenAI-Beta` token, or a credential in clear. The rules are
`core.handshake_headers.handshake_violations`; `scripts/audit_flows.py` is the
command line.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from mitmproxy import exceptions, http
from mitmproxy import io as mitmio
from mitmproxy.flow import Flow

from responses_ws_bridge.core.handshake_headers import handshake_violations
from responses_ws_bridge.recording.session_flows import METADATA_KEY, TRANSPORT_HTTP

_WS_SCHEMES = {"http": "ws", "https": "wss"}


@dataclass(frozen=True)
class Finding:
    source: str
    flow_id: str
    url: str
    violation: str

    def __str__(self) -> str:
        return f"{self.source}: {self.flow_id}, {self.url}: {self.violation}"


@dataclass
class AuditReport:
    findings: list[Finding] = field(default_factory=list)
    handshakes: int = 0
    files: int = 0
    unreadable: list[str] = field(default_factory=list)

    @property
    def exit_status(self) -> int:
        if self.unreadable:
            return 2
        return 1 if self.findings else 0

    def summary(self) -> str:
        flagged = len({(f.source, f.flow_id) for f in self.findings})
        head = f"{self.handshakes} WebSocket handshakes in {self.files} files"
        verdict = (
            f"{len(self.findings)} violations in {flagged} handshakes"
            if self.findings
            else "no violations"
        )
        tail = f", {len(self.unreadable)} files unreadable" if self.unreadable else ""
        return f"{head}: {verdict}{tail}"


def is_websocket_handshake(flow: Flow) -> bool:
    """An upstream handshake: a WebSocket upgrade that is not a bridge's client flow."""
    if not isinstance(flow, http.HTTPFlow):
        return False
    meta = flow.metadata.get(METADATA_KEY)
    role = meta.get("role") if isinstance(meta, dict) else None
    if role == "client" or (isinstance(meta, dict) and meta.get("transport") == TRANSPORT_HTTP):
        return False  # a client's flow, or a request the pool forwarded over HTTP
    upgrade = any(v.strip().lower() == "websocket" for v in flow.request.headers.get_all("upgrade"))
    return upgrade or role == "upstream"


def websocket_url(request: http.Request) -> str:
    scheme = _WS_SCHEMES.get(request.scheme, request.scheme)
    return scheme + request.url[len(request.scheme) :]


def audit_flows(flows: Iterable[Flow], source: str) -> tuple[int, list[Finding]]:
    """(handshakes seen, findings) for the flows of one file."""
    seen = 0
    findings: list[Finding] = []
    for flow in flows:
        if not is_websocket_handshake(flow):
            continue
        assert isinstance(flow, http.HTTPFlow)
        seen += 1
        headers = [
            (k.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape"))
            for k, v in flow.request.headers.fields
        ]
        url = websocket_url(flow.request)
        findings.extend(
            Finding(source, flow.id, url, problem) for problem in handshake_violations(headers)
        )
    return seen, findings


def audit_files(paths: Sequence[str]) -> AuditReport:
    report = AuditReport()
    for path in paths:
        try:
            with open(path, "rb") as fp:
                seen, findings = audit_flows(mitmio.FlowReader(fp).stream(), path)
        except OSError as exc:
            report.unreadable.append(f"{path}: {exc.strerror or exc}")
            continue
        except exceptions.FlowReadException as exc:
            report.unreadable.append(f"{path}: not a readable flow file ({exc})")
            continue
        report.files += 1
        report.handshakes += seen
        report.findings.extend(findings)
    return report
