"""The alert rules as Prometheus rule groups and as a PrometheusRule object.

The rules themselves are data, in `alerts.yaml` beside this module, with
`<<name>>` placeholders for the thresholds and the job selector. This module
fills them from a plain dict of settings (the render machinery passes the
`alerts` part of its values) and wraps them for the Prometheus Operator. It
does not write files or talk to a cluster.
"""

from __future__ import annotations

import copy
import re
from importlib import resources
from typing import Any

import yaml

from jcl_k8s.errors import UserError

API_VERSION = "monitoring.coreos.com/v1"

DEFAULTS: dict[str, Any] = {
    # PrometheusRule metadata; an empty namespace is left out (kubectl's current one applies).
    "name": "jcl-training",
    "namespace": "default",
    # Extra metadata labels, e.g. the `release` label a Prometheus ruleSelector wants.
    "labels": {},
    # `job` label values to cover; empty covers every series with a `job` label.
    "jobs": [],
    # Severity of the warnings (a non-finite loss is always critical).
    "severity": "warning",
    "thresholds": {
        # Minutes without one training step before JCLTrainingStalled.
        "no_progress_minutes": 15,
        # Minutes since the newest successful checkpoint before JCLCheckpointTooOld.
        "checkpoint_max_age_minutes": 60,
        # Phases expected to checkpoint (a regular expression over `phase`).
        "checkpoint_phases": "pretrain",
        # JCLThroughputDropped: 5-minute throughput below this share of its recent average.
        "throughput_drop_ratio": 0.5,
        # Minutes over which that recent average is taken.
        "throughput_baseline_minutes": 60,
        # JCLDataStarved: share of step time spent waiting for data.
        "data_wait_share": 0.5,
        # JCLRepeatedRestarts: this many restarts of rank 0 ...
        "restarts": 3,
        # ... within this many minutes.
        "restarts_window_minutes": 60,
    },
}

_PLACEHOLDER = re.compile(r"<<(\w+)>>")


class RulesError(UserError):
    """Alert settings that cannot be used, naming the setting."""


def settings(values: dict[str, Any] | None = None) -> dict[str, Any]:
    """The defaults with `values` merged over them, checked for unknown keys."""
    merged = copy.deepcopy(DEFAULTS)
    for key, value in (values or {}).items():
        if key not in DEFAULTS:
            raise RulesError(f"unknown alert setting {key!r}; known: {sorted(DEFAULTS)}")
        if key == "thresholds":
            unknown = sorted(set(value) - set(DEFAULTS["thresholds"]))
            if unknown:
                raise RulesError(f"unknown alert threshold thresholds.{unknown[0]}")
            merged["thresholds"].update(value)
        else:
            merged[key] = value
    return merged


def rule_groups(values: dict[str, Any] | None = None) -> dict[str, Any]:
    """The rules as a Prometheus rule file (`{"groups": [...]}`), for promtool or a plain server."""
    config = settings(values)
    thresholds = config["thresholds"]
    fills = {
        **{key: str(value) for key, value in thresholds.items()},
        "no_progress_seconds": str(int(thresholds["no_progress_minutes"] * 60)),
        "checkpoint_max_age_seconds": str(int(thresholds["checkpoint_max_age_minutes"] * 60)),
        "selector": _selector(config["jobs"]),
        "severity": str(config["severity"]),
    }
    template = yaml.safe_load(resources.files(__package__).joinpath("alerts.yaml").read_text())
    return _fill(template, fills)


def prometheus_rule(values: dict[str, Any] | None = None) -> dict[str, Any]:
    """The PrometheusRule object (monitoring.coreos.com/v1) holding the rule groups."""
    config = settings(values)
    labels = {
        "app.kubernetes.io/name": "jcl-k8s",
        "app.kubernetes.io/component": "alerts",
        **config["labels"],
    }
    metadata: dict[str, Any] = {"name": config["name"]}
    if config["namespace"]:
        metadata["namespace"] = config["namespace"]
    metadata["labels"] = labels
    return {
        "apiVersion": API_VERSION,
        "kind": "PrometheusRule",
        "metadata": metadata,
        "spec": rule_groups(values),
    }


def _selector(jobs: list[str]) -> str:
    if not jobs:
        return 'job=~".+"'
    # re.escape's backslashes are doubled once more for the PromQL string literal.
    pattern = "|".join(re.escape(job).replace("\\", "\\\\") for job in jobs)
    return f'job=~"{pattern}"'


def _fill(node: Any, fills: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {key: _fill(value, fills) for key, value in node.items()}
    if isinstance(node, list):
        return [_fill(value, fills) for value in node]
    if isinstance(node, str):
        return _PLACEHOLDER.sub(lambda match: fills[match.group(1)], node)
    return node
