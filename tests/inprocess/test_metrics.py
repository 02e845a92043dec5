"""The metrics endpoint, scraped over real HTTP on 127.0.0.1."""

from __future__ import annotations

import json

import httpx
import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons
from prometheus_client.parser import text_string_to_metric_families
from responses_ws_bridge.addons.metrics import BridgeMetricsAddon, pool_gauges
from responses_ws_bridge.core.accounts import parse_accounts
from responses_ws_bridge.core.affinity import classify
from responses_ws_bridge.core.create_request import parse_create_request
from responses_ws_bridge.core.failures import HandshakeRejected
from responses_ws_bridge.core.pool_state import PoolState
from responses_ws_bridge.core.turns import Attempt, Destination, Turn
from responses_ws_bridge.shell.metrics import (
    AccountGauges,
    BridgeMetrics,
    GaugeSnapshot,
    MetricsServer,
    label,
    parse_listen,
)
from responses_ws_bridge.shell.session_pool import SessionPool
from responses_ws_bridge.shell.turn_metrics import record_report

SECRET = "sk-proj-abcdefghijklmnopqrstuvwxyz0123456789"
SESSION_KEY = "session:0195c1d2-aaaa-bbbb"


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    assert response.status_code == 200
    assert SECRET not in response.text and "0195c1d2" not in response.text
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def recorded() -> BridgeMetrics:
    snapshot = GaugeSnapshot(
        accounts=(
            AccountGauges("team-a", "healthy", 2, {"primary": 42.5, "secondary": 3.0}, 7),
            AccountGauges("team-b", "cooling", 0),
        ),
        idle_sessions=4,
    )
    metrics = BridgeMetrics(lambda: snapshot)
    metrics.request_finished("response.completed", "hard", 1.5)
    metrics.request_finished("response.completed", "hard", 0.2)
    metrics.request_finished("error", "none", 0.01)
    metrics.attempt("closed", 1011)
    metrics.attempt("response.completed")
    metrics.attempt(f"error_event:{SECRET}")  # only the part before ":" is a label
    metrics.retry("same")
    metrics.first_event("hard", 0.3)
    metrics.state_store_error("lookup", "timeout")
    # A careless caller: unknown words read "other", never the value itself.
    metrics.request_finished(SESSION_KEY, SESSION_KEY, 1.0)
    metrics.retry(SECRET)
    metrics.state_store_error("lookup", SECRET)
    return metrics


def test_scraped_text_has_every_metric() -> None:
    server = MetricsServer(recorded().registry)
    port = server.start("127.0.0.1", 0)
    try:
        s = scrape(port)
    finally:
        server.stop()
    assert (
        s[("bridge_requests_total", (("affinity", "hard"), ("outcome", "response.completed")))] == 2
    )
    assert (
        s[("bridge_upstream_attempts_total", (("close_code", "1011"), ("result", "closed")))] == 1
    )
    assert (
        s[("bridge_upstream_attempts_total", (("close_code", "none"), ("result", "error_event")))]
        == 1
    )
    assert s[("bridge_retries_total", (("target", "same"),))] == 1
    assert s[("bridge_retries_total", (("target", "other"),))] == 1
    assert s[("bridge_requests_total", (("affinity", "other"), ("outcome", "other")))] == 1
    assert (
        s[("bridge_state_store_errors_total", (("kind", "redacted"), ("operation", "lookup")))] == 1
    )
    assert s[("bridge_time_to_first_event_seconds_count", (("affinity", "hard"),))] == 1
    assert (
        s[
            (
                "bridge_request_duration_seconds_bucket",
                (("le", "0.5"), ("outcome", "response.completed")),
            )
        ]
        == 1
    )
    assert (
        s[("bridge_state_store_errors_total", (("kind", "timeout"), ("operation", "lookup")))] == 1
    )
    assert s[("bridge_account_health", (("account", "team-b"), ("state", "cooling")))] == 1
    assert s[("bridge_account_health", (("account", "team-b"), ("state", "healthy")))] == 0
    assert s[("bridge_account_in_flight", (("account", "team-a"),))] == 2
    assert s[("bridge_account_bound_sessions", (("account", "team-a"),))] == 7
    assert s[("bridge_account_bound_sessions", (("account", "team-b"),))] == 0
    assert (
        s[("bridge_rate_limit_used_percent", (("account", "team-a"), ("window", "primary")))]
        == 42.5
    )
    assert s[("bridge_idle_sessions", ())] == 4


def test_the_server_stops() -> None:
    server = MetricsServer(BridgeMetrics().registry)
    port = server.start("127.0.0.1", 0)
    server.stop()
    assert server.port is None
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("completed", "completed"),
        ("a b/c", "a_b_c"),
        (SECRET, "redacted"),
        ("", "none"),
        (1011, "1011"),
    ],
)
def test_label_values(value: object, expected: str) -> None:
    assert label(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", None),
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        (":9", ("127.0.0.1", 9)),
        ("[::1]:80", ("::1", 80)),
    ],
)
def test_parse_listen(value: str, expected: tuple[str, int] | None) -> None:
    assert parse_listen(value) == expected


@pytest.mark.parametrize("value", ["9464", "host:", "h:99999", "h:x"])
def test_parse_listen_rejects(value: str) -> None:
    with pytest.raises(ValueError):
        parse_listen(value)


def test_addon_serves_and_stops_on_the_option() -> None:
    addon = BridgeMetricsAddon(recorded())
    with taddons.context(addon) as tctx:
        tctx.configure(addon, bridge_metrics="127.0.0.1:0")
        port = addon.port
        assert port is not None
        assert scrape(port)[("bridge_idle_sessions", ())] == 4
        with pytest.raises(exceptions.OptionsError, match="bridge_metrics"):
            tctx.configure(addon, bridge_metrics="nonsense")
        tctx.configure(addon, bridge_metrics="")
        assert addon.port is None
        addon.done()


def test_a_turns_report_becomes_metrics() -> None:
    metrics = BridgeMetrics()
    turn = Turn(
        flow_id="f",
        create=parse_create_request(b'{"model": "m", "input": "hi", "stream": true}', max_body=999),
        client_headers=(("session-id", "s"),),
        request_id="r",
        destination=Destination("http", "127.0.0.1", 1, "/v1/responses"),
        affinity=classify([("session-id", "s")], {}),
        client_credential=None,
    )
    turn.report.attempts += [
        Attempt(1, "a", "ws://x", reused=True, outcome="dead_reused_socket", close_code=1006),
        Attempt(2, "a", "ws://x", outcome="closed", close_code=1011),
        Attempt(3, "a", "ws://x", preconnected=True, outcome="response.completed"),
    ]
    record_report(metrics, turn.report, "response.completed", 0.5)
    value = metrics.registry.get_sample_value
    completed = {"outcome": "response.completed", "affinity": "hard"}
    assert value("bridge_requests_total", completed) == 1
    assert value("bridge_upstream_attempts_total", {"result": "closed", "close_code": "1011"}) == 1
    dead = {"result": "dead_reused_socket", "close_code": "1006"}
    assert value("bridge_upstream_attempts_total", dead) == 1
    assert value("bridge_retries_total", {"target": "same"}) == 2
    assert value("bridge_request_duration_seconds_count", {"outcome": "response.completed"}) == 1
    # Per account: the request it served, and each attempt with the socket it went out on.
    assert value("bridge_account_requests_total", {"account": "a", "affinity": "hard"}) == 1
    attempts = [
        ({"result": "dead_reused_socket", "socket": "reused"}, 1),
        ({"result": "closed", "socket": "new"}, 1),
        ({"result": "response.completed", "socket": "preconnected"}, 1),
    ]
    for labels, count in attempts:
        assert value("bridge_account_attempts_total", {"account": "a", **labels}) == count


def test_store_reachability_and_the_process_are_gauges() -> None:
    metrics = BridgeMetrics(lambda: GaugeSnapshot(store_reachable=False))
    value = metrics.registry.get_sample_value
    assert value("bridge_state_store_reachable") == 0
    assert (value("process_resident_memory_bytes") or 0) > 0
    assert value("process_open_fds") is not None
    # Without a shared store there is no such gauge, rather than a made-up value.
    assert BridgeMetrics().registry.get_sample_value("bridge_state_store_reachable") is None


def test_gauges_come_from_the_pool_and_the_sessions() -> None:
    state = PoolState()
    config = {"accounts": [{"id": "a", "api_key": "k-a"}, {"id": "b", "api_key": "k-b"}]}
    state.set_accounts(parse_accounts(json.dumps(config)))
    assert state.pool is not None
    state.pool.acquire("a")
    state.pool.record_failure("b", HandshakeRejected(401))
    state.bind(classify([("session-id", "s-1"), ("thread-id", "t-1")], {}), "b")
    snapshot = pool_gauges(state, SessionPool(), None)
    assert snapshot == GaugeSnapshot(
        (AccountGauges("a", "healthy", 1), AccountGauges("b", "disabled", 0, {}, 1)), 0
    )
