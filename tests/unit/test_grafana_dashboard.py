"""docs/grafana/enrichd-dashboard.json queries only metrics (and labels) the daemon exports.

The exported names are scraped, not listed: the daemon's own instruments
(``service.telemetry.build``) each record one value, the gauges are registered by the
daemon's own ``telemetry.register_state_gauges`` over a stand-in batcher, and the registry
``/metrics`` serves is rendered with ``prometheus_client.generate_latest``.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.observability import telemetry

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "enrichd-dashboard.json"
DS_UID = "${DS_PROMETHEUS}"
# Labels Prometheus adds when it scrapes, and the histogram bucket label.
SCRAPE_LABELS = {"instance", "job", "le"}
PROMQL_WORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
}


@pytest.fixture(scope="module")
def exported() -> dict[str, set[str]]:
    """Sample name → its label names, as the daemon's /metrics renders them."""

    metrics, registry, provider = telemetry.build(True)
    assert registry is not None
    try:
        metrics.received.add(1, {"handler": "summarize"})
        metrics.retries.add(1, {"handler": "summarize", "code": "rate_limited"})
        metrics.rate_limit_wait.add(0.25, {"model": "gpt-4o-mini"})
        # completed, dlq, tokens, cost and latency, through the daemon's own recording path.
        metrics.outcome(
            {
                "handler": "summarize",
                "route": "sync",
                "status": "error",
                "cached": False,
                "error": {"code": "timeout", "message": "", "retryable": True},
                "model": "gpt-4o-mini",
                "usage": {"input_tokens": 10, "output_tokens": 2},
                "cost_usd": 0.001,
            },
            1.5,
        )
        buffer = SimpleNamespace(count=3, bytes=300, oldest=datetime.now(UTC) - timedelta(seconds=5))
        batcher = SimpleNamespace(
            last_buffers={"enrich._buffer.tok": buffer}, batches_by_status={"in_progress": 1}
        )
        telemetry.register_state_gauges(metrics, batcher, lambda: 2)
        text = generate_latest(registry).decode()
    finally:
        provider.shutdown()
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dash["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def exprs(dash: dict[str, Any]) -> list[str]:
    found = [t["expr"] for p in panels(dash) for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var.get("type") == "query":
            found.append(var["definition"])
    return found


def parse(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) a PromQL expression uses. Enough PromQL for dashboards:
    selectors, ranges, aggregations with by/without, functions and arithmetic."""
    expr = re.sub(r"\$__\w+|\$\w+", "x", expr)  # Grafana variables
    labels: set[str] = set()
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        labels.update(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", matchers))
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)
    for grouping in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", expr):
        labels.update(name.strip() for name in grouping.split(",") if name.strip())
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    # label_values(metric, label): the label is the last argument.
    for label in re.findall(r"label_values\([^,()]+,\s*(\w+)\s*\)", expr):
        labels.add(label)
        expr = expr.replace(f", {label})", ")")
    names = {
        token
        for token in re.findall(r"(?<![\w.])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()", expr)
        if token.lower() not in PROMQL_WORDS
    }
    return names, labels


def test_parse_promql() -> None:
    names, labels = parse(
        'histogram_quantile(0.95, sum by (le, route) (rate(a_bucket{handler=~"$handler"}[$__rate_interval])))'
        " / on (route) b_total * 3600"
    )
    assert names == {"a_bucket", "b_total"}
    assert labels == {"le", "route", "handler"}


def test_dashboard_metrics_are_exported(exported: dict[str, set[str]]) -> None:
    dash = dashboard()
    used: set[str] = set()
    for expr in exprs(dash):
        names, labels = parse(expr)
        assert names, f"no metric in {expr!r}"
        unknown = names - set(exported)
        assert not unknown, f"{expr!r} uses {sorted(unknown)}; the daemon exports {sorted(exported)}"
        available = set().union(*(exported[n] for n in names)) | SCRAPE_LABELS
        assert labels <= available, f"{expr!r} uses labels {sorted(labels - available)} its metrics lack"
        used |= names
    # And every metric the daemon exports has a panel (target_info is OTel's resource info).
    families = {re.sub(r"_(bucket|count|sum)$", "", n) for n in exported} - {"target_info"}
    missing = {f for f in families if not any(u == f or u.startswith(f + "_") for u in used)}
    assert not missing, f"exported but not on the dashboard: {sorted(missing)}"


def test_dashboard_imports_cleanly() -> None:
    dash = dashboard()
    (ds_input,) = dash["__inputs"]
    assert ds_input["name"] == "DS_PROMETHEUS" and ds_input["pluginId"] == "prometheus"
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels(dash):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == DS_UID, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DS_UID, panel["title"]
    for var in dash["templating"]["list"]:
        assert var["datasource"]["uid"] == DS_UID, var["name"]
    assert dash["id"] is None and dash["uid"]
