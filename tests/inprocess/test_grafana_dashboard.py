"""docs/grafana-dashboard.json queries only series the bridge's metrics output has."""

from __future__ import annotations

import json
import re
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from responses_ws_bridge.core.affinity import Affinity, AffinityKind
from responses_ws_bridge.core.turns import Attempt, TurnReport
from responses_ws_bridge.shell.metrics import AccountGauges, BridgeMetrics, GaugeSnapshot
from responses_ws_bridge.shell.turn_metrics import record_report

from tests.support.data import ROOT

DASHBOARD = ROOT / "docs" / "grafana-dashboard.json"
SERIES = re.compile(r"\b((?:bridge|process)_[a-z_]+)\b(\{[^}]*\})?")
GROUPED = re.compile(r"\bby \(([^)]*)\)")
MATCHER = re.compile(r"([a-z_]+)\s*(?:=~|!~|!=|=)")
# Added by Prometheus when it scrapes, not by the bridge.
SCRAPE_LABELS = {"instance", "job"}


def exposition() -> dict[str, set[str]]:
    """Every sample name in the bridge's /metrics text, with the labels it carries."""
    snapshot = GaugeSnapshot(
        (AccountGauges("team-a", "healthy", 1, {"primary": 10.0}, 2),),
        idle_sessions=1,
        store_reachable=True,
    )
    metrics = BridgeMetrics(lambda: snapshot)
    report = TurnReport(Affinity(AffinityKind.HARD, "session:s", "session-id"))
    report.attempts += [
        Attempt(1, "team-a", "ws://x", outcome="closed", close_code=1011),
        Attempt(2, "team-a", "ws://x", outcome="response.completed"),
    ]
    record_report(metrics, report, "response.completed", 0.4)
    metrics.first_event("hard", 0.1)
    metrics.state_store_error("lookup", "timeout")
    text = generate_latest(metrics.registry).decode()
    found: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, set()).update(sample.labels)
    return found


def queries(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["expr"]] if isinstance(node.get("expr"), str) else []
        return own + [q for value in node.values() for q in queries(value)]
    if isinstance(node, list):
        return [q for value in node for q in queries(value)]
    return []


def test_every_series_the_dashboard_queries_exists() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exprs = queries(dashboard["panels"])
    assert len(exprs) >= 15
    have = exposition()
    for expr in exprs:
        series = SERIES.findall(expr)
        assert series, expr
        names = [name for name, _ in series]
        for name, matchers in series:
            assert name in have, f"{name} (in {expr}) is not in the metrics output"
            used = set(MATCHER.findall(matchers)) - SCRAPE_LABELS
            assert used <= have[name], f"{expr}: {name} has no label {used - have[name]}"
        for group in GROUPED.findall(expr):
            labels = {x.strip() for x in group.split(",")} - SCRAPE_LABELS
            assert any(labels <= have[name] for name in names), f"{expr}: by ({group})"


def test_the_dashboard_is_a_grafana_dashboard() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["targets"] and panel["gridPos"]["w"] > 0
