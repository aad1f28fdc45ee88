"""The Grafana dashboard of a training run, and its ConfigMap form for Grafana's sidecar.

The dashboard is built here as data: rows of panels, each panel a list of
PromQL targets over the metrics of `jcl_k8s.metrics`. It is templated by
`$datasource` (any Prometheus data source), `$namespace` (the label the
PodMonitor adds; '.*' also matches series that have none) and `$job` (the
`job` label the trainer sets on its own series, so the PodMonitor must honour
it). Every expression selects with `SELECTOR`, so a test can substitute the
variables and run each one against a real Prometheus.
"""

from __future__ import annotations

import json
from typing import Any

SCHEMA_VERSION = 39
UID = "jcl-training"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SELECTOR = 'namespace=~"$namespace", job=~"$job"'
CONFIGMAP_KEY = "jcl-dashboard.json"
# What the kube-prometheus-stack Grafana sidecar watches for by default.
SIDECAR_LABEL = {"grafana_dashboard": "1"}

_S = SELECTOR
_RATE = "$__rate_interval"


def _quantiles(metric: str) -> list[tuple[str, str]]:
    return [
        (
            f"histogram_quantile({q}, sum by (job, le) (rate({metric}_bucket{{{_S}}}[{_RATE}])))",
            f"{{{{job}}}} p{int(q * 100)}",
        )
        for q in (0.5, 0.95)
    ]


# Rank-0 restarts in the last hour, counted as in the JCLRepeatedRestarts alert.
_RESTARTS = (
    f'(count by (job) (count_over_time(jcl_process_start_time_seconds{{{_S}, rank="0"}}[1h])) - 1)'
    f' + sum by (job) (changes(jcl_process_start_time_seconds{{{_S}, rank="0"}}[1h]))'
)

# (row title, [(panel title, kind, unit, width, [(expr, legend), ...]), ...])
ROWS: list[tuple[str, list[tuple[str, str, str, int, list[tuple[str, str]]]]]] = [
    ("Progress", [
        ("Progress", "gauge", "percentunit", 4, [
            (f"max by (job) (jcl_epoch{{{_S}}}) / max by (job) (jcl_planned_epochs{{{_S}}})",
             "{{job}}"),
        ]),
        ("ETA", "stat", "s", 4, [(f"max by (job) (jcl_eta_seconds{{{_S}}})", "{{job}}")]),
        ("Epoch", "timeseries", "none", 8, [
            (f"max by (job) (jcl_epoch{{{_S}}})", "{{job}} epoch"),
            (f"max by (job) (jcl_planned_epochs{{{_S}}})", "{{job}} planned"),
        ]),
        ("Global step", "timeseries", "none", 8, [
            (f"max by (job) (jcl_global_step{{{_S}}})", "{{job}}"),
        ]),
    ]),
    ("Throughput", [
        ("Throughput per rank (images/s)", "timeseries", "none", 8, [
            (f"sum by (job, rank) (rate(jcl_samples_total{{{_S}}}[{_RATE}]))",
             "{{job}} rank {{rank}}"),
        ]),
        ("Throughput, all ranks (images/s)", "timeseries", "none", 8, [
            (f"sum by (job) (rate(jcl_samples_total{{{_S}}}[{_RATE}]))", "{{job}} counted"),
            # Each rank reports the whole job's throughput (global batch / its step time).
            (f"max by (job) (jcl_images_per_second{{{_S}}})", "{{job}} reported"),
        ]),
        ("Steps per second", "timeseries", "none", 8, [
            (f"max by (job) (rate(jcl_steps_total{{{_S}}}[{_RATE}]))", "{{job}}"),
        ]),
    ]),
    ("Loss and learning rate", [
        ("Loss terms", "timeseries", "none", 8, [
            (f"avg by (job, phase, term) (jcl_loss{{{_S}}})", "{{job}} {{term}}"),
        ]),
        ("Learning rate", "timeseries", "none", 8, [
            (f"max by (job, phase) (jcl_learning_rate{{{_S}}})", "{{job}} {{phase}}"),
        ]),
        ("Linear-eval accuracy", "timeseries", "percentunit", 8, [
            (f"max by (job, topk) (jcl_val_accuracy_ratio{{{_S}}})", "{{job}} top-{{topk}}"),
        ]),
    ]),
    ("Step time and data", [
        ("Step time p50 / p95", "timeseries", "s", 8, _quantiles("jcl_step_seconds")),
        ("Data wait p50 / p95", "timeseries", "s", 8, _quantiles("jcl_data_wait_seconds")),
        ("Data-wait share of step time", "timeseries", "percentunit", 8, [
            (f"sum by (job) (rate(jcl_data_wait_seconds_sum{{{_S}}}[{_RATE}]))"
             f" / sum by (job) (rate(jcl_step_seconds_sum{{{_S}}}[{_RATE}]))", "{{job}}"),
        ]),
    ]),
    ("Checkpoints and faults", [
        ("Checkpoint age", "timeseries", "s", 6, [
            (f"time() - max by (job) (jcl_checkpoint_last_success_timestamp_seconds{{{_S}}})",
             "{{job}}"),
        ]),
        ("Checkpoint save time (mean over 1h) and size", "timeseries", "s", 6, [
            (f"max by (job) (increase(jcl_checkpoint_save_seconds_sum{{{_S}}}[1h])"
             f" / increase(jcl_checkpoint_save_seconds_count{{{_S}}}[1h]))", "{{job}} seconds"),
            (f"max by (job) (jcl_checkpoint_size_bytes{{{_S}}})", "{{job}} bytes"),
        ]),
        ("Restarts, preemptions and failures (last 1h)", "timeseries", "none", 6, [
            (_RESTARTS, "{{job}} restarts"),
            (f"sum by (job) (increase(jcl_preemptions_total{{{_S}}}[1h]))", "{{job}} preemptions"),
            (f"sum by (job) (increase(jcl_resumes_total{{{_S}}}[1h]))", "{{job}} resumes"),
            (f"sum by (job) (increase(jcl_checkpoint_failures_total{{{_S}}}[1h]))",
             "{{job}} checkpoint failures"),
            (f"sum by (job) (increase(jcl_nonfinite_losses_total{{{_S}}}[1h]))",
             "{{job}} non-finite losses"),
        ]),
        ("World size", "timeseries", "none", 6, [
            (f"max by (job) (jcl_world_size{{{_S}}})", "{{job}}"),
        ]),
        ("Skipped images and S3 retries (per second)", "timeseries", "none", 12, [
            (f"sum by (job) (rate(jcl_skipped_images_total{{{_S}}}[{_RATE}]))",
             "{{job}} skipped images"),
            (f"sum by (job) (rate(jcl_s3_retries_total{{{_S}}}[{_RATE}]))", "{{job}} S3 retries"),
        ]),
        ("GPU memory", "timeseries", "bytes", 12, [
            (f"max by (job, rank) (jcl_gpu_memory_allocated_bytes{{{_S}}})",
             "{{job}} rank {{rank}} allocated"),
            (f"max by (job, rank) (jcl_gpu_memory_reserved_bytes{{{_S}}})",
             "{{job}} rank {{rank}} reserved"),
            (f"max by (job, rank) (jcl_gpu_memory_peak_allocated_bytes{{{_S}}})",
             "{{job}} rank {{rank}} peak"),
        ]),
    ]),
]

PANEL_HEIGHT = 8


def grafana_dashboard(*, title: str = "JCL training", uid: str = UID) -> dict[str, Any]:
    """The dashboard as Grafana's JSON model (importable as is)."""
    panels: list[dict[str, Any]] = []
    y = 0
    for row_title, row_panels in ROWS:
        panels.append({
            "id": len(panels) + 1, "type": "row", "title": row_title, "collapsed": False,
            "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": [],
        })
        y += 1
        x = 0
        for panel_title, kind, unit, width, targets in row_panels:
            if x + width > 24:
                x, y = 0, y + PANEL_HEIGHT
            panels.append(_panel(len(panels) + 1, panel_title, kind, unit,
                                 {"h": PANEL_HEIGHT, "w": width, "x": x, "y": y}, targets))
            x += width
        y += PANEL_HEIGHT
    return {
        "uid": uid,
        "title": title,
        "description": "JCL / MoCo v2 pretraining and linear evaluation (jcl-k8s).",
        "tags": ["jcl-k8s", "training"],
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "timezone": "browser",
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "30s",
        "annotations": {"list": []},
        "links": [],
        "templating": {"list": _variables()},
        "panels": panels,
    }


def dashboard_json(dashboard: dict[str, Any] | None = None) -> str:
    """The dashboard as the JSON text committed under manifests/grafana/."""
    return json.dumps(dashboard or grafana_dashboard(), indent=2) + "\n"


def grafana_configmap(
    namespace: str | None,
    *,
    name: str = "jcl-dashboard",
    labels: dict[str, str] | None = None,
    folder: str | None = None,
) -> dict[str, Any]:
    """A ConfigMap holding the dashboard, labelled for the Grafana dashboard sidecar.

    namespace: None or '' leaves it out (kubectl's current namespace applies).
    labels: replaces the sidecar label (default grafana_dashboard: "1") where the
    sidecar is configured to watch another one. folder: the sidecar's
    `grafana_folder` annotation, where its folderAnnotation is set to that name.
    """
    metadata: dict[str, Any] = {"name": name}
    if namespace:
        metadata["namespace"] = namespace
    metadata["labels"] = {
        "app.kubernetes.io/name": "jcl-k8s",
        "app.kubernetes.io/component": "dashboard",
        **(SIDECAR_LABEL if labels is None else labels),
    }
    if folder:
        metadata["annotations"] = {"grafana_folder": folder}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata,
        "data": {CONFIGMAP_KEY: dashboard_json()},
    }


def panel_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) of every target of every panel."""
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def resolve_variables(expr: str, values: dict[str, str]) -> str:
    """expr with `$name` (and `${name}`) replaced as Grafana would, for querying it elsewhere."""
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", values[name]).replace("$" + name, values[name])
    return expr


def _panel(
    panel_id: int,
    title: str,
    kind: str,
    unit: str,
    grid: dict[str, int],
    targets: list[tuple[str, str]],
) -> dict[str, Any]:
    panel: dict[str, Any] = {
        "id": panel_id,
        "type": kind,
        "title": title,
        "datasource": DATASOURCE,
        "gridPos": grid,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr,
             "legendFormat": legend, "range": True}
            for i, (expr, legend) in enumerate(targets)
        ],
    }
    if unit == "percentunit":
        panel["fieldConfig"]["defaults"].update({"min": 0, "max": 1})
    if kind == "timeseries":
        panel["options"] = {"legend": {"displayMode": "list", "placement": "bottom"},
                            "tooltip": {"mode": "multi"}}
    else:
        panel["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "",
                                              "values": False}}
    return panel


def _variables() -> list[dict[str, Any]]:
    def query(name: str, label: str, definition: str, all_value: str) -> dict[str, Any]:
        return {
            "name": name, "label": label, "type": "query", "datasource": DATASOURCE,
            "definition": definition, "query": definition, "refresh": 2, "sort": 1,
            "includeAll": True, "multi": True, "allValue": all_value,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        }

    return [
        {"name": "datasource", "label": "Data source", "type": "datasource",
         "query": "prometheus", "refresh": 1, "current": {}},
        query("namespace", "Namespace",
              "label_values(jcl_process_start_time_seconds, namespace)", ".*"),
        query("job", "Job",
              'label_values(jcl_process_start_time_seconds{namespace=~"$namespace"}, job)', ".+"),
    ]
