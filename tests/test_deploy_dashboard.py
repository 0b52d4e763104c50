"""The Grafana dashboard and its provisioning: metric names, PromQL syntax, structure."""

from __future__ import annotations

import json

import pytest
import yaml

from deploy_support import (
    DEPLOY,
    as_promql,
    exported_metric_names,
    run_promtool,
    streamfit_metric_names,
)

DASHBOARD = DEPLOY / "grafana" / "dashboards" / "streamfit.json"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def panels(dashboard: dict) -> list[dict]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def queries(dashboard: dict) -> list[tuple[str, str]]:
    """Return (where, expression) for every query of the dashboard."""
    found = [(f"panel {p['title']!r}", t["expr"]) for p in panels(dashboard) for t in p["targets"]]
    found += [(f"variable {v['name']!r}", v["query"]["query"]) for v in dashboard["templating"]["list"]]
    found += [(f"annotation {a['name']!r}", a["expr"]) for a in dashboard["annotations"]["list"]]
    return found


def test_dashboard_uses_exported_metrics(dashboard):
    known = exported_metric_names()
    for where, expr in queries(dashboard):
        unknown = streamfit_metric_names(expr) - known
        assert not unknown, f"{where} uses metrics the code does not export: {sorted(unknown)}"


def test_renamed_metric_detected(dashboard):
    # The check above must fail for a dashboard that names a metric the
    # code does not export, as after a rename.
    text = DASHBOARD.read_text().replace("streamfit_worker_records_learned_total", "streamfit_worker_learned_total")
    renamed = json.loads(text)
    known = exported_metric_names()
    unknown = set().union(*(streamfit_metric_names(e) for _, e in queries(renamed))) - known

    assert unknown == {"streamfit_worker_learned_total"}


# Each view the dashboard must show, with a metric that only that view uses.
REQUIRED_VIEWS = {
    "records learned per second": "streamfit_worker_records_learned_total",
    "records rejected per second": "streamfit_worker_records_rejected_total",
    "consumer lag per partition": "streamfit_worker_partition_lag_records",
    "versions published": "streamfit_worker_publish_duration_seconds_count",
    "test-then-train metric per model": "streamfit_worker_scored_correct_total",
    "drift detections": "streamfit_worker_drift_detections_total",
    "CAS conflicts": "streamfit_worker_publish_conflicts_total",
    "publish latency percentiles": "streamfit_worker_publish_duration_seconds_bucket",
    "predict latency percentiles": "streamfit_predictor_request_duration_seconds_bucket",
    "served version per model": "streamfit_predictor_served_version",
    "staleness per model": "streamfit_predictor_version_age_seconds",
    "cache evictions": "streamfit_predictor_cache_evictions_total",
}


@pytest.mark.parametrize("view, metric", sorted(REQUIRED_VIEWS.items()))
def test_dashboard_shows_view(dashboard, view, metric):
    used = set().union(*(streamfit_metric_names(t["expr"]) for p in panels(dashboard) for t in p["targets"]))

    assert metric in used, f"no panel shows {view} ({metric})"


def test_percentile_panels_use_histogram_quantile(dashboard):
    for panel in panels(dashboard):
        for target in panel["targets"]:
            if "_bucket" in target["expr"]:
                assert target["expr"].startswith("histogram_quantile("), panel["title"]
                assert "by (le" in target["expr"], panel["title"]


@pytest.mark.slow
def test_queries_are_valid_promql(dashboard, tmp_path):
    # promtool parses every query as a recording rule; Grafana's variables
    # are replaced by values first, as Grafana does before sending a query.
    rules = [
        {"record": f"streamfit_dashboard:query_{i}", "expr": as_promql(expr)}
        for i, (_, expr) in enumerate(queries(dashboard))
        if not expr.startswith("label_values(")
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))

    result = run_promtool("check", "rules", str(path))

    assert result.returncode == 0, result.stdout + result.stderr


def test_panels_refer_to_provisioned_datasource(dashboard):
    provisioned = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    uids = {source["uid"] for source in provisioned}
    for panel in panels(dashboard):
        assert panel["datasource"]["uid"] in uids, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] in uids, panel["title"]
    assert provisioned[0]["url"] == "http://prometheus:9090"


def test_panel_layout(dashboard):
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        assert panel["title"]
    for panel in panels(dashboard):
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        assert panel.get("description"), f"panel {panel['title']!r} has no description"


def test_model_variable_used(dashboard):
    variable = dashboard["templating"]["list"][0]

    assert variable["name"] == "model"
    assert variable["allValue"] == ".*"
    assert any('model=~"$model"' in expr for _, expr in queries(dashboard))
