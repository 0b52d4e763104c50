"""Prometheus configuration and alert rules, checked with promtool and against the exported metrics."""

from __future__ import annotations

import pytest
import yaml

from deploy_support import DEPLOY, exported_metric_names, run_promtool, streamfit_metric_names

PROMETHEUS = DEPLOY / "prometheus"

pytestmark = pytest.mark.slow  # the first run builds promtool, which takes minutes


def rule_expressions() -> list[tuple[str, str]]:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    return [(rule["alert"], rule["expr"]) for group in rules["groups"] for rule in group["rules"]]


def test_config_valid(tmp_path):
    # The config names the rules by their path in the container; the copy
    # points at the file of the checkout instead.
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    config["rule_files"] = [str(PROMETHEUS / path.rsplit("/", 1)[1]) for path in config["rule_files"]]
    local = tmp_path / "prometheus.yml"
    local.write_text(yaml.safe_dump(config))

    result = run_promtool("check", "config", str(local))

    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_rules_valid():
    result = run_promtool("check", "rules", "alerts.yml")

    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rule_expressions())} rules found" in result.stdout


def test_rules_unit_tests_pass():
    result = run_promtool("test", "rules", "alerts_test.yml")

    assert result.returncode == 0, result.stdout + result.stderr


def test_broken_rule_rejected(tmp_path):
    broken = tmp_path / "alerts.yml"
    broken.write_text((PROMETHEUS / "alerts.yml").read_text().replace("> 1000", "> > 1000", 1))

    result = run_promtool("check", "rules", str(broken))

    assert result.returncode != 0


def test_rules_use_exported_metrics():
    known = exported_metric_names()
    for alert, expr in rule_expressions():
        unknown = streamfit_metric_names(expr) - known
        assert not unknown, f"alert {alert} uses metrics the code does not export: {sorted(unknown)}"


def test_every_issue_alert_present():
    alerts = {name for name, _ in rule_expressions()}
    expected = {
        "StreamfitConsumerLagGrowing",
        "StreamfitNoVersionPublished",
        "StreamfitRejectionsSpiking",
        "StreamfitPublishConflictsSpiking",
        "StreamfitPredictorStale",
        "StreamfitModelLoadFailures",
        "StreamfitDriftDetected",
    }
    assert expected <= alerts


def test_every_alert_unit_tested():
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())
    tested = {
        case["alertname"]
        for test in tests["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert tested == {name for name, _ in rule_expressions()}
