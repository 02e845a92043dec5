"""Prometheus metrics of the bridge, on their own registry and their own HTTP listener.

The service calls the recording methods as things happen; account and
session gauges are read at scrape time from a snapshot callback, so they are
never stale and cost nothing between scrapes. Labels carry only words from
fixed vocabularies (anything else reads "other"), close codes, and account
ids, which are names, not credentials; the few free-form values (account ids,
window names, error class names) are cut to a safe alphabet and scrubbed of
anything that looks like a key.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from responses_ws_bridge.core.handshake_headers import contains_secret

# Seconds: from a few milliseconds (a reused socket) to a long agentic turn.
TTFE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
DURATION_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)
HEALTH_STATES = ("healthy", "cooling", "disabled")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.:-]")

# How a request ended (`TurnReport.outcome`) and how an attempt did (`Attempt.outcome`,
# the part before ":"), as the service names them.
TERMINALS = frozenset({"response.completed", "response.failed", "response.incomplete"})
REQUEST_OUTCOMES = TERMINALS | {"error", "stream_incomplete", "client_gone"}
ATTEMPT_RESULTS = TERMINALS | {
    "error_event",
    "rejected",
    "connect_failed",
    "closed",
    "connection_lost",
    "dead_reused_socket",
    "upstream_silent",
    "invalid_event",
    "refresh_failed",
    "client_gone",
    "bad_url",
}
AFFINITY_KINDS = frozenset({"hard", "soft", "none"})
RETRY_TARGETS = frozenset({"same", "other"})
# Which socket an attempt went out on: opened for it, an idle one of its session, or
# opened on a TCP/TLS connection made ahead.
SOCKETS = frozenset({"new", "reused", "preconnected"})
# The account label of a pass-through request, served with the client's own credential.
CLIENT_CREDENTIAL = "client_credential"


def label(value: object) -> str:
    """A label value that cannot carry a secret or an unbounded string."""
    text = str(value)
    if contains_secret(text):
        return "redacted"
    return _UNSAFE.sub("_", text)[:48] or "none"


def word(value: str, vocabulary: frozenset[str]) -> str:
    """`value` when it is one of the known words, else "other": no unbounded label."""
    return value if value in vocabulary else "other"


def _account(account: str | None) -> str:
    return label(account) if account is not None else CLIENT_CREDENTIAL


@dataclass(frozen=True)
class AccountGauges:
    """One account at scrape time. `health` is one of HEALTH_STATES; `rate_limits` maps a
    window name (e.g. "primary", "secondary") to its used percent."""

    id: str
    health: str
    in_flight: int
    rate_limits: Mapping[str, float] = field(default_factory=dict)
    bound_sessions: int = 0


@dataclass(frozen=True)
class GaugeSnapshot:
    accounts: tuple[AccountGauges, ...] = ()
    idle_sessions: int = 0
    # Whether the shared state store answered its last call (None: no shared store).
    store_reachable: bool | None = None


class BridgeMetrics:
    def __init__(self, snapshot: Callable[[], GaugeSnapshot] | None = None) -> None:
        self.registry = CollectorRegistry()
        self.snapshot = snapshot
        r = self.registry
        self._requests = Counter(
            "bridge_requests",
            "Bridged requests, by how they ended and their affinity kind.",
            ["outcome", "affinity"],
            registry=r,
        )
        self._attempts = Counter(
            "bridge_upstream_attempts",
            "Upstream attempts, by result and WebSocket close code (none: not closed).",
            ["result", "close_code"],
            registry=r,
        )
        self._retries = Counter(
            "bridge_retries", "Retries, by where they went (same, other).", ["target"], registry=r
        )
        self._ttfe = Histogram(
            "bridge_time_to_first_event_seconds",
            "From the request to the first upstream event sent to the client.",
            ["affinity"],
            buckets=TTFE_BUCKETS,
            registry=r,
        )
        self._duration = Histogram(
            "bridge_request_duration_seconds",
            "From the request to its last byte, by outcome.",
            ["outcome"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self._store_errors = Counter(
            "bridge_state_store_errors",
            "Failed or timed-out state-store calls, by operation and error kind.",
            ["operation", "kind"],
            registry=r,
        )
        self._account_requests = Counter(
            "bridge_account_requests",
            "Requests each account served (its last attempt's), by affinity kind: the "
            "load split, and with hard affinity how sessions stick.",
            ["account", "affinity"],
            registry=r,
        )
        self._account_attempts = Counter(
            "bridge_account_attempts",
            "Upstream attempts per account, by result and by the socket they went out on "
            "(new, reused, preconnected).",
            ["account", "result", "socket"],
            registry=r,
        )
        r.register(_GaugeCollector(self))
        # CPU, memory, file descriptors of this process (Linux).
        ProcessCollector(registry=r)

    # recording, called by the service

    def request_finished(self, outcome: str, affinity: str, duration_s: float) -> None:
        outcome = word(outcome, REQUEST_OUTCOMES)
        self._requests.labels(outcome, word(affinity, AFFINITY_KINDS)).inc()
        self._duration.labels(outcome).observe(duration_s)

    def attempt(self, result: str, close_code: int | None = None) -> None:
        code = str(close_code) if close_code is not None and 0 <= close_code < 5000 else "none"
        self._attempts.labels(word(result.split(":", 1)[0], ATTEMPT_RESULTS), code).inc()

    def account_request(self, account: str | None, affinity: str) -> None:
        self._account_requests.labels(_account(account), word(affinity, AFFINITY_KINDS)).inc()

    def account_attempt(self, account: str | None, result: str, socket: str) -> None:
        result = word(result.split(":", 1)[0], ATTEMPT_RESULTS)
        self._account_attempts.labels(_account(account), result, word(socket, SOCKETS)).inc()

    def retry(self, target: str) -> None:
        """target: "same" (RetrySame) or "other" (RetryOther)."""
        self._retries.labels(word(target, RETRY_TARGETS)).inc()

    def first_event(self, affinity: str, seconds: float) -> None:
        self._ttfe.labels(word(affinity, AFFINITY_KINDS)).observe(seconds)

    def state_store_error(self, operation: str, kind: str) -> None:
        self._store_errors.labels(label(operation), label(kind)).inc()

    def gauges(self) -> GaugeSnapshot:
        return self.snapshot() if self.snapshot is not None else GaugeSnapshot()


class _GaugeCollector(Collector):
    def __init__(self, metrics: BridgeMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        snap = self._metrics.gauges()
        health = GaugeMetricFamily(
            "bridge_account_health",
            "1 for the account's current health state, 0 for the others.",
            labels=["account", "state"],
        )
        in_flight = GaugeMetricFamily(
            "bridge_account_in_flight", "Requests in flight per account.", labels=["account"]
        )
        sessions = GaugeMetricFamily(
            "bridge_account_bound_sessions",
            "Sessions bound to each account (every instance's with a shared store).",
            labels=["account"],
        )
        used = GaugeMetricFamily(
            "bridge_rate_limit_used_percent",
            "The latest rate-limit used percent the upstream reported, per account and window.",
            labels=["account", "window"],
        )
        for account in snap.accounts:
            name = label(account.id)
            for state in HEALTH_STATES:
                health.add_metric([name, state], 1.0 if account.health == state else 0.0)
            in_flight.add_metric([name], float(account.in_flight))
            sessions.add_metric([name], float(account.bound_sessions))
            for window, percent in sorted(account.rate_limits.items()):
                used.add_metric([name, label(window)], float(percent))
        idle = GaugeMetricFamily(
            "bridge_idle_sessions", "Upstream WebSocket sessions open and idle for reuse."
        )
        idle.add_metric([], float(snap.idle_sessions))
        families: list[Metric] = [health, in_flight, sessions, used, idle]
        if snap.store_reachable is not None:
            store = GaugeMetricFamily(
                "bridge_state_store_reachable",
                "1 while the shared state store answered its last call, 0 during an outage.",
            )
            store.add_metric([], 1.0 if snap.store_reachable else 0.0)
            families.append(store)
        return families

    def describe(self) -> Iterable[Metric]:
        return []


def parse_listen(value: str) -> tuple[str, int] | None:
    """`host:port` (`[::1]:9100`; `:9100` is 127.0.0.1); empty: off. ValueError if malformed."""
    value = value.strip()
    if not value:
        return None
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"{value!r} is not host:port")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range")
    host = host.strip("[]") or "127.0.0.1"
    return host, port


class MetricsServer:
    """prometheus_client's own HTTP server for one registry, in a thread, stoppable."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int | None:
        return self._server.server_port if self._server is not None else None

    def start(self, host: str, port: int) -> int:
        self.stop()
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        return self._server.server_port

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(5)
