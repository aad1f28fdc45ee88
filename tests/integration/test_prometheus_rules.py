"""The alert rules pass `promtool check rules` and their promtool unit tests."""

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from jcl_k8s.k8s.render import render_values
from jcl_k8s.k8s.validate import rule_problems
from jcl_k8s.observability.dashboard import grafana_dashboard, panel_queries, resolve_variables
from jcl_k8s.observability.rules import prometheus_rule, rule_groups

REPO = Path(__file__).resolve().parents[2]
PROMTOOL_TESTS = REPO / "tests" / "promtool"

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    return path


def promtool_run(promtool: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_default_rules_pass_promtool_check(promtool, tmp_path):
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule_groups(), sort_keys=False))
    result = promtool_run(promtool, "check", "rules", "rules.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "8 rules found" in result.stdout


@pytest.mark.parametrize("sets", [[], ["metrics.alerts.noProgressMinutes=5",
                                       "metrics.alerts.throughputDropRatio=0.3",
                                       "metrics.alerts.restarts=2"]])
def test_rendered_prometheus_rule_passes_promtool_check(promtool, tmp_path, sets):
    """The object `jcl-k8s render` writes (and manifests/prometheusrule.yaml holds)."""
    rule = next(obj for _, obj in render_values(sets=sets) if obj["kind"] == "PrometheusRule")
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert rule["metadata"]["name"] and rule_problems(rule) == []
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule["spec"], sort_keys=False))
    result = promtool_run(promtool, "check", "rules", "rules.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "8 rules found" in result.stdout
    if not sets:
        committed = yaml.safe_load((REPO / "manifests" / "prometheusrule.yaml").read_text())
        assert committed == rule


def test_rules_with_a_job_list_and_other_thresholds_pass_promtool_check(promtool, tmp_path):
    values = {"jobs": ["pretrain-a", "lincls.b"],
              "thresholds": {"no_progress_minutes": 5, "restarts": 2}}
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(prometheus_rule(values)["spec"]))
    result = promtool_run(promtool, "check", "rules", "rules.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_each_alert_fires_on_a_fault_and_stays_quiet_when_healthy(promtool, tmp_path):
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule_groups(), sort_keys=False))
    tests = tmp_path / "alerts_test.yaml"
    shutil.copy(PROMTOOL_TESTS / "alerts_test.yaml", tests)
    covered = {
        case["alertname"]
        for group in yaml.safe_load(tests.read_text())["tests"]
        for case in group["alert_rule_test"]
        if case["exp_alerts"]
    }
    alerts = {rule["alert"] for group in rule_groups()["groups"] for rule in group["rules"]
              if "alert" in rule}
    assert covered == alerts, f"alerts without a firing test: {sorted(alerts - covered)}"

    result = promtool_run(promtool, "test", "rules", tests.name, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_dashboard_expression_parses(promtool, tmp_path):
    variables = {"namespace": ".*", "job": ".+", "__rate_interval": "1m"}
    records = [
        {"record": f"dashboard:expr{i}", "expr": resolve_variables(expr, variables)}
        for i, (_, expr) in enumerate(panel_queries(grafana_dashboard()))
    ]
    rules = {"groups": [{"name": "dashboard", "rules": records}]}
    (tmp_path / "dashboard.yaml").write_text(yaml.safe_dump(rules))
    result = promtool_run(promtool, "check", "rules", "dashboard.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
