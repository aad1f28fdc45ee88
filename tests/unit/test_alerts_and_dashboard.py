"""Alert rules and the Grafana dashboard, checked as data (their committed manifests are
render's: tests/unit/test_k8s_render.py)."""

import json
import re

import pytest
import yaml

from jcl_k8s.metrics import TrainingMetrics
from jcl_k8s.observability.dashboard import (
    CONFIGMAP_KEY,
    SELECTOR,
    grafana_configmap,
    grafana_dashboard,
    panel_queries,
)
from jcl_k8s.observability.rules import RulesError, prometheus_rule, rule_groups

GPU_METRICS = {"jcl_gpu_memory_allocated_bytes", "jcl_gpu_memory_reserved_bytes",
               "jcl_gpu_memory_peak_allocated_bytes"}


def all_rules(groups: dict) -> list[dict]:
    return [rule for group in groups["groups"] for rule in group["rules"]]


def exported_metric_names() -> set[str]:
    """Names of every series a TrainingMetrics exports once each call was made (no GPU)."""
    m = TrainingMetrics("pretrain", "j", 0, 0, 0)
    m.set_world_size(2)
    m.set_epoch(1, 2)
    m.observe_step(samples=1, step_seconds=0.1, data_wait_seconds=0.0)
    m.observe_log(loss=1.0, ce=1.0, jcl=0.0, lr=0.1, images_per_second=1.0, eta_seconds=1.0,
                  global_step=1)
    m.observe_checkpoint(seconds=1.0, size_bytes=10)
    m.observe_accuracy(top1=1.0, top5=2.0)
    names = {sample.name for family in m.registry.collect() for sample in family.samples}
    return {re.sub(r"_(bucket|count|sum)$", "", name) for name in names}


def test_prometheus_rule_object():
    rule = prometheus_rule({"namespace": "ml", "name": "jcl", "labels": {"release": "kps"}})
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["kind"] == "PrometheusRule"
    assert rule["metadata"]["namespace"] == "ml" and rule["metadata"]["name"] == "jcl"
    assert rule["metadata"]["labels"]["release"] == "kps"
    assert rule["spec"] == rule_groups()


def test_every_alert_is_labelled_and_explained_and_fully_filled():
    rules = all_rules(rule_groups())
    alerts = [rule for rule in rules if "alert" in rule]
    assert {a["alert"] for a in alerts} == {
        "JCLTrainingStalled", "JCLLossNotFinite", "JCLCheckpointTooOld",
        "JCLThroughputDropped", "JCLDataStarved", "JCLRepeatedRestarts",
    }
    for alert in alerts:
        assert alert["labels"]["severity"] in ("warning", "critical")
        assert alert["annotations"]["summary"] and alert["annotations"]["description"]
    assert "<<" not in yaml.safe_dump(rule_groups())


def test_thresholds_and_jobs_reach_the_expressions():
    groups = rule_groups({
        "jobs": ["pretrain-a", "lincls.b"], "severity": "page",
        "thresholds": {"no_progress_minutes": 7, "data_wait_share": 0.8},
    })
    rules = {rule.get("alert", rule.get("record")): rule for rule in all_rules(groups)}
    stalled = rules["JCLTrainingStalled"]["expr"]
    assert "[7m]" in stalled and "> 420" in stalled
    assert 'job=~"pretrain\\\\-a|lincls\\\\.b"' in stalled
    assert rules["JCLDataStarved"]["expr"].endswith("> 0.8")
    assert rules["JCLDataStarved"]["labels"]["severity"] == "page"
    assert rules["JCLLossNotFinite"]["labels"]["severity"] == "critical"


@pytest.mark.parametrize("values", [{"nope": 1}, {"thresholds": {"no_progress": 3}}])
def test_unknown_settings_are_refused_by_name(values):
    with pytest.raises(RulesError, match="nope|no_progress"):
        prometheus_rule(values)


def test_dashboard_is_importable_grafana_json():
    dashboard = grafana_dashboard()
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"namespace", "job"} <= set(variables)
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [target["refId"] for target in panel["targets"]]
        assert refs and len(refs) == len(set(refs))
    json.loads(json.dumps(dashboard))


def test_every_dashboard_selector_is_templated_by_namespace_and_job():
    for title, expr in panel_queries(grafana_dashboard()):
        selectors = re.findall(r"\bjcl_\w+(\{[^}]*\})?", expr)
        assert selectors, f"{title}: no jcl_ metric in {expr}"
        for selector in re.finditer(r"\b(jcl_\w+)(\{[^}]*\})?", expr):
            assert selector.group(2) and SELECTOR in selector.group(2), (
                f"{title}: {selector.group(1)} is not selected by namespace and job"
            )


def test_dashboard_shows_every_exported_metric_and_only_those():
    exprs = " ".join(expr for _, expr in panel_queries(grafana_dashboard()))
    used = {re.sub(r"_(bucket|count|sum)$", "", name) for name in re.findall(r"\bjcl_\w+", exprs)}
    exported = exported_metric_names()
    assert exported - used == set(), "exported but on no panel"
    assert used - exported - GPU_METRICS == set(), "on a panel but never exported"


def test_the_issue_s_panels_are_there():
    titles = " | ".join(panel["title"].lower() for panel in grafana_dashboard()["panels"])
    for needed in ("progress", "eta", "throughput per rank", "all ranks", "loss terms",
                   "learning rate", "step time", "data wait", "checkpoint age",
                   "checkpoint save time", "preemptions", "world size", "accuracy"):
        assert needed in titles, needed


def test_configmap_carries_the_dashboard_for_the_sidecar():
    configmap = grafana_configmap("monitoring", folder="Training")
    assert configmap["kind"] == "ConfigMap" and configmap["apiVersion"] == "v1"
    assert configmap["metadata"]["namespace"] == "monitoring"
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "Training"}
    assert json.loads(configmap["data"][CONFIGMAP_KEY]) == grafana_dashboard()
    custom = grafana_configmap("m", labels={"my_dashboards": "yes"})
    assert "grafana_dashboard" not in custom["metadata"]["labels"]
    assert custom["metadata"]["labels"]["my_dashboards"] == "yes"
