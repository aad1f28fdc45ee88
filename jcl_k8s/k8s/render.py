"""Values to Kubernetes objects: the PyTorchJobs and their ConfigMaps, a ServiceAccount, and the
monitoring (a PodMonitor per job, the alerts' PrometheusRule, the Grafana dashboard's ConfigMap).

The design rules the objects follow, and why (see the training operator's behaviour):
- Worker-only elastic PyTorchJobs with c10d rendezvous, an explicit `nprocPerNode` (the
  default "auto" spawns one process per host core on CPU), a unique `rdzvId` (torchrun's
  default id is the literal "none") and explicit rendezvous timeouts.
- `restartPolicy: OnFailure` with a `backoffLimit`: a preempted or evicted pod is recreated by
  the operator without counting against the limit, and a torchrun that exits 1 after losing
  worker-0 (which hosts the c10d store) is restarted in place. `ExitCode` would treat that
  exit 1 as permanent, and does not bound its own retries.
- `terminationGracePeriodSeconds` covers torchrun's shutdown timeout (the wait between SIGTERM
  and SIGKILL of the trainers, set through TORCH_ELASTIC_SHUTDOWN_TIMEOUT), in which the
  trainers save a checkpoint.
- Every port of the `pytorch` container is named (the operator builds the per-pod Services
  from them); no readiness probe, since it would delay worker-0's DNS name.
- The training settings are a ConfigMap holding a trainer config file; the container runs the
  image's entrypoint (`jcl-k8s launch`), which waits for the rendezvous host's DNS name.
- One PodMonitor per job, named like the job and selecting its pods by the operator's
  `training.kubeflow.org/job-name` label, so rendering and applying one job never changes the
  other's scraping. It scrapes every named metrics port of the `pytorch` container (one per
  training process) and honours the trainer's own `job` label, which the dashboard and the
  alerts select on. The PrometheusRule and the dashboard cover every jcl-k8s job, so they are
  the same whichever job is rendered.

This module owns the mapping from values to objects and their YAML; values.py owns the values.
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import yaml

from jcl_k8s.k8s.entrypoint import ENTRYPOINT
from jcl_k8s.k8s.values import JOBS, ValuesError, defaults_text, load_values
from jcl_k8s.observability import dashboard, rules

CONFIG_DIR = "/etc/jcl-k8s"
"""Where the pod sees the ConfigMap holding its trainer config file."""
SHM_DIR = "/dev/shm"
JOB_NAME_LABEL = "training.kubeflow.org/job-name"
"""The label the training operator puts on every pod of a job."""
DASHBOARD_CONFIGMAP_FILE = "grafana/dashboard-configmap.yaml"
DASHBOARD_JSON_FILE = "grafana/jcl-dashboard.json"
"""The dashboard itself, for import by hand; written beside the rendered objects."""
RDZV_PORT_NAME = "pytorchjob-port"
"""The operator's name for the rendezvous port; it reads the port from the container by it."""
USER_ID = 1000
"""The image's non-root user and group (docker/Dockerfile)."""
SIGTERM_MARGIN_SECONDS = 15
"""Grace-period slack over torchrun's shutdown timeout, for launch and torchrun to exit."""

HEADER = (
    "# Rendered by `jcl-k8s render` from the default values (jcl_k8s/k8s/values.yaml).\n"
    "# Do not edit: change values and re-render with `jcl-k8s render --write manifests`.\n"
)

_DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_DNS_1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def render(values: dict[str, Any], job: str = "all") -> list[tuple[str, dict[str, Any]]]:
    """The objects for `job` ('pretrain', 'lincls' or 'all'), each with its manifest file name."""
    if job not in (*JOBS, "all"):
        raise ValuesError(f"--job must be pretrain, lincls or all, not {job!r}")
    jobs = [name for name in JOBS if values[name]["enabled"] and job in (name, "all")]
    if not jobs:
        raise ValuesError(f"nothing to render: {job}.enabled is false")
    _check(values, jobs)

    objects: list[tuple[str, dict[str, Any]]] = []
    if values["serviceAccount"]["create"]:
        objects.append(("serviceaccount.yaml", service_account(values)))
    metrics = values["metrics"]
    for name in jobs:
        objects.append((f"{name}-configmap.yaml", config_map(values, name)))
        objects.append((f"{name}-pytorchjob.yaml", pytorch_job(values, name)))
        if metrics["podMonitor"]["enabled"] and metrics["port"]:
            objects.append((f"{name}-podmonitor.yaml", pod_monitor(values, name)))
    if metrics["alerts"]["enabled"] and metrics["port"]:
        objects.append(("prometheusrule.yaml", prometheus_rule(values)))
    if metrics["dashboard"]["enabled"] and metrics["port"]:
        objects.append((DASHBOARD_CONFIGMAP_FILE, dashboard_config_map(values)))
    return objects


def render_values(
    files: list[str] | None = None,
    sets: list[str] | None = None,
    set_strings: list[str] | None = None,
    job: str = "all",
) -> list[tuple[str, dict[str, Any]]]:
    """Load values (defaults, files, --set) and render them."""
    return render(load_values(files or [], sets or [], set_strings or []), job)


# ---------------------------------------------------------------------------- objects


def service_account(values: dict[str, Any]) -> dict[str, Any]:
    account = values["serviceAccount"]
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(values, account["name"], "training", account["annotations"]),
        # The trainers never call the Kubernetes API.
        "automountServiceAccountToken": False,
    }


def config_map(values: dict[str, Any], job: str) -> dict[str, Any]:
    text = yaml.safe_dump(training_config(values, job), sort_keys=False, default_flow_style=False)
    header = f"# {job} settings for `jcl-k8s {job} --preset {values[job]['preset']}`\n"
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(values, config_map_name(values, job), job),
        "data": {f"{job}.yaml": header + text},
    }


def config_map_name(values: dict[str, Any], job: str) -> str:
    return f"{values[job]['name']}-config"


def training_config(values: dict[str, Any], job: str) -> dict[str, Any]:
    """The trainer config file of `job`: its `training` section plus what the chart owns."""
    config = copy.deepcopy(values[job]["training"])
    if job == "lincls":
        # Nulls stand for the pretrain job's settings: the same data, its run's checkpoints.
        pretrain = values["pretrain"]["training"]
        if config.get("pretrained") is None:
            config["pretrained"] = pretrain["output_url"]
        data = config.setdefault("data", {})
        if data.get("url") is None:
            data["url"] = pretrain["data"]["url"]
    config = _drop_nulls(config)
    config["metrics"] = {"port": values["metrics"]["port"]}
    return config


def _drop_nulls(tree: dict[str, Any]) -> dict[str, Any]:
    """Leave out null settings (the preset's apply), and maps left empty by that."""
    kept = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            inner = _drop_nulls(value)
            if inner or not value:
                kept[key] = inner
        elif value is not None:
            kept[key] = value
    return kept


def pytorch_job(values: dict[str, Any], job: str) -> dict[str, Any]:
    spec = values[job]
    restart, rdzv = values["restart"], values["rendezvous"]
    nodes = spec["nodes"]
    run_policy: dict[str, Any] = {
        "cleanPodPolicy": restart["cleanPodPolicy"],
        "backoffLimit": restart["backoffLimit"],
    }
    for key in ("activeDeadlineSeconds", "ttlSecondsAfterFinished"):
        if restart[key] is not None:
            run_policy[key] = restart[key]
    rdzv_conf = {
        "join_timeout": rdzv["joinTimeoutSeconds"],
        "last_call_timeout": rdzv["lastCallTimeoutSeconds"],
        "close_timeout": rdzv["closeTimeoutSeconds"],
        "read_timeout": rdzv["readTimeoutSeconds"],
    }
    metadata = _metadata(values, spec["name"], job)
    metadata["annotations"] = {"jcl-k8s/output-url": training_config(values, job)["output_url"]}
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": metadata,
        "spec": {
            "nprocPerNode": str(nproc_per_node(values)),
            "elasticPolicy": {
                "rdzvBackend": rdzv["backend"],
                "rdzvPort": rdzv["port"],
                "rdzvId": rendezvous_id(values, job),
                "rdzvConf": [{"key": k, "value": str(v)} for k, v in rdzv_conf.items()],
                "minReplicas": nodes["min"],
                "maxReplicas": nodes["max"],
                "maxRestarts": restart["maxRestarts"],
            },
            "runPolicy": run_policy,
            "pytorchReplicaSpecs": {
                "Worker": {
                    "replicas": nodes["replicas"],
                    "restartPolicy": restart["policy"],
                    "template": _pod_template(values, job),
                }
            },
        },
    }


def _pod_template(values: dict[str, Any], job: str) -> dict[str, Any]:
    pod, rdzv = values["pod"], values["rendezvous"]
    labels = {**_labels(values, values[job]["name"], job), **pod["labels"]}
    metadata: dict[str, Any] = {"labels": labels}
    if pod["annotations"]:
        metadata["annotations"] = dict(pod["annotations"])

    spec: dict[str, Any] = {
        "serviceAccountName": values["serviceAccount"]["name"],
        "terminationGracePeriodSeconds": pod["terminationGracePeriodSeconds"],
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": USER_ID,
            "runAsGroup": USER_ID,
            "fsGroup": USER_ID,
        },
    }
    if pod["priorityClassName"]:
        spec["priorityClassName"] = pod["priorityClassName"]
    if values["image"]["pullSecrets"]:
        spec["imagePullSecrets"] = [{"name": name} for name in values["image"]["pullSecrets"]]
    for key in ("nodeSelector", "tolerations", "affinity"):
        if pod[key]:
            spec[key] = pod[key]

    container: dict[str, Any] = {
        "name": "pytorch",  # the operator requires this name
        "image": f"{values['image']['repository']}:{values['image']['tag']}",
        "imagePullPolicy": values["image"]["pullPolicy"],
        "command": list(ENTRYPOINT),
        "args": [
            "--dns-timeout", str(rdzv["dnsTimeoutSeconds"]), "--",
            job, "--preset", values[job]["preset"], "--config", f"{CONFIG_DIR}/{job}.yaml",
        ],
        "env": _env(values, job),
    }
    if values["s3"]["secretName"]:
        container["envFrom"] = [{"secretRef": {"name": values["s3"]["secretName"]}}]
    container["ports"] = _ports(values)
    container["resources"] = _resources(values)
    container["volumeMounts"] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "dshm", "mountPath": SHM_DIR},
    ]
    container["securityContext"] = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }
    spec["containers"] = [container]
    spec["volumes"] = [
        {"name": "config", "configMap": {"name": config_map_name(values, job)}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": pod["shmSize"]}},
    ]
    return {"metadata": metadata, "spec": spec}


def _env(values: dict[str, Any], job: str) -> list[dict[str, Any]]:
    env = [
        {"name": "JCL_JOB_NAME", "value": values[job]["name"]},
        {
            "name": "TORCH_ELASTIC_SHUTDOWN_TIMEOUT",
            "value": str(values["restart"]["shutdownTimeoutSeconds"]),
        },
    ]
    if values["s3"]["region"]:
        env.append({"name": "AWS_DEFAULT_REGION", "value": values["s3"]["region"]})
    if values["s3"]["endpointUrl"]:
        env.append({"name": "AWS_ENDPOINT_URL", "value": values["s3"]["endpointUrl"]})
    return env + list(values["pod"]["env"])


def _ports(values: dict[str, Any]) -> list[dict[str, Any]]:
    ports = [
        {"name": RDZV_PORT_NAME, "containerPort": values["rendezvous"]["port"], "protocol": "TCP"}
    ]
    for name, number in metrics_ports(values):
        ports.append({"name": name, "containerPort": number, "protocol": "TCP"})
    return ports


def metrics_ports(values: dict[str, Any]) -> list[tuple[str, int]]:
    """(name, port) of each training process's /metrics; none when metrics.port is 0."""
    base = values["metrics"]["port"]
    if not base:
        return []
    return [(f"metrics-{i}", base + i) for i in range(nproc_per_node(values))]


def _resources(values: dict[str, Any]) -> dict[str, Any]:
    pod = values["pod"]
    requests: dict[str, Any] = {"cpu": pod["cpu"], "memory": pod["memory"]}
    limits: dict[str, Any] = {"memory": pod["memory"]}
    if pod["cpuLimit"]:
        limits["cpu"] = pod["cpuLimit"]
    if pod["gpus"]:
        requests[pod["gpuResource"]] = pod["gpus"]
        limits[pod["gpuResource"]] = pod["gpus"]
    for name, amount in pod["extraResources"].items():
        requests[name] = amount
        limits[name] = amount
    return {"requests": requests, "limits": limits}


def pod_monitor(values: dict[str, Any], job: str) -> dict[str, Any]:
    """The PodMonitor of one job: its pods, every training process's metrics port."""
    monitor = values["metrics"]["podMonitor"]
    metadata = _metadata(values, values[job]["name"], "metrics")
    metadata["labels"].update(monitor["labels"])
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": metadata,
        "spec": {
            "selector": {"matchLabels": {JOB_NAME_LABEL: values[job]["name"]}},
            "podTargetLabels": [JOB_NAME_LABEL, "training.kubeflow.org/replica-index"],
            "podMetricsEndpoints": [
                # honorLabels: the trainer's own `job` label must not become `exported_job`.
                {"port": name, "path": "/metrics", "interval": monitor["interval"],
                 "honorLabels": True}
                for name, _ in metrics_ports(values)
            ],
        },
    }


def alert_settings(values: dict[str, Any]) -> dict[str, Any]:
    """The `jcl_k8s.observability.rules` settings for these values."""
    alerts = values["metrics"]["alerts"]
    return {
        "name": alerts["name"],
        "namespace": values["namespace"],
        "labels": {**_labels(values, alerts["name"], "alerts"), **alerts["labels"]},
        "severity": alerts["severity"],
        "thresholds": {
            "no_progress_minutes": alerts["noProgressMinutes"],
            "checkpoint_max_age_minutes": alerts["checkpointMaxAgeMinutes"],
            "throughput_drop_ratio": alerts["throughputDropRatio"],
            "data_wait_share": alerts["dataWaitShare"],
            "restarts": alerts["restarts"],
        },
    }


def prometheus_rule(values: dict[str, Any]) -> dict[str, Any]:
    """The alerts and their recording rules as a PrometheusRule (every job's `job` label)."""
    return rules.prometheus_rule(alert_settings(values))


def dashboard_config_map(values: dict[str, Any]) -> dict[str, Any]:
    """The Grafana dashboard as a ConfigMap the Grafana sidecar picks up by its label."""
    board = values["metrics"]["dashboard"]
    config_map = dashboard.grafana_configmap(
        board["namespace"] or values["namespace"],
        labels={**_labels(values, "jcl-dashboard", "dashboard"),
                board["sidecarLabel"]: board["sidecarLabelValue"]},
        folder=board["folder"] or None,
    )
    return config_map


# ---------------------------------------------------------------------------- derived values


def nproc_per_node(values: dict[str, Any]) -> int:
    """Training processes per pod: one per GPU, or one on CPU, unless set."""
    pod = values["pod"]
    if pod["nprocPerNode"] is not None:
        return pod["nprocPerNode"]
    return pod["gpus"] or 1


def rendezvous_id(values: dict[str, Any], job: str) -> str:
    """A stable id unique per (namespace, job, run URL): re-applying the same run keeps it."""
    if values["rendezvous"]["id"]:
        return values["rendezvous"]["id"]
    output_url = training_config(values, job)["output_url"]
    key = f"{values['namespace']}/{values[job]['name']}/{output_url}"
    return f"{values[job]['name']}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def _labels(values: dict[str, Any], instance: str, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "jcl-k8s",
        "app.kubernetes.io/instance": instance,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/version": str(values["image"]["tag"]),
        "app.kubernetes.io/managed-by": "jcl-k8s",
    }


def _metadata(
    values: dict[str, Any], name: str, component: str, annotations: dict[str, Any] | None = None
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if values["namespace"]:
        metadata["namespace"] = values["namespace"]
    metadata["labels"] = _labels(values, name, component)
    if annotations:
        metadata["annotations"] = dict(annotations)
    return metadata


# ---------------------------------------------------------------------------- checks


def _check(values: dict[str, Any], jobs: list[str]) -> None:
    """What the schema cannot say: ranges, consistency, and that the trainer accepts its config."""
    pod, restart = values["pod"], values["restart"]
    if pod["gpus"] < 0:
        raise ValuesError(f"pod.gpus must be 0 (CPU) or more, got {pod['gpus']}")
    nproc = pod["nprocPerNode"]
    if nproc is not None:
        if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
            raise ValuesError(f"pod.nprocPerNode must be null or a positive integer, got {nproc!r}")
        if pod["gpus"] and nproc != pod["gpus"]:
            raise ValuesError(
                f"pod.nprocPerNode ({nproc}) must equal pod.gpus ({pod['gpus']}): each training "
                "process drives one GPU (or leave nprocPerNode null)"
            )
    if restart["policy"] not in ("OnFailure", "ExitCode", "Never"):
        raise ValuesError(
            f"restart.policy must be OnFailure, ExitCode or Never, got {restart['policy']!r}"
            + (" (Always reruns a worker that finished)" if restart["policy"] == "Always" else "")
        )
    if restart["cleanPodPolicy"] not in ("None", "Running", "All"):
        raise ValuesError(
            "restart.cleanPodPolicy must be None, Running or All, "
            f"got {restart['cleanPodPolicy']!r}"
        )
    for key in ("maxRestarts", "backoffLimit", "shutdownTimeoutSeconds"):
        if restart[key] < 0:
            raise ValuesError(f"restart.{key} must not be negative, got {restart[key]}")
    needed = restart["shutdownTimeoutSeconds"] + SIGTERM_MARGIN_SECONDS
    if pod["terminationGracePeriodSeconds"] < needed:
        raise ValuesError(
            f"pod.terminationGracePeriodSeconds ({pod['terminationGracePeriodSeconds']}) must "
            f"be at least restart.shutdownTimeoutSeconds + {SIGTERM_MARGIN_SECONDS} ({needed}), "
            "or the kubelet kills the trainers while they save their checkpoint"
        )
    if values["rendezvous"]["backend"] not in ("c10d", "etcd", "etcd-v2"):
        raise ValuesError(
            "rendezvous.backend must be c10d, etcd or etcd-v2, "
            f"got {values['rendezvous']['backend']!r}"
        )
    ports = [values["rendezvous"]["port"], *(port for _, port in metrics_ports(values))]
    if any(not 0 < port < 65536 for port in ports):
        raise ValuesError(f"ports must be within 1..65535: {ports}")
    if len(set(ports)) != len(ports):
        raise ValuesError(
            f"metrics ports {ports[1:]} overlap rendezvous.port {ports[0]}: move metrics.port"
        )
    _check_monitoring(values)
    names = [values[job]["name"] for job in jobs]
    if len(set(names)) != len(names):
        raise ValuesError(f"pretrain.name and lincls.name must differ, both are {names[0]!r}")
    for job in jobs:
        _check_job(values, job)


def _check_monitoring(values: dict[str, Any]) -> None:
    alerts, board = values["metrics"]["alerts"], values["metrics"]["dashboard"]
    for key in ("noProgressMinutes", "checkpointMaxAgeMinutes", "restarts"):
        if alerts[key] < 1:
            raise ValuesError(f"metrics.alerts.{key} must be at least 1, got {alerts[key]}")
    for key in ("throughputDropRatio", "dataWaitShare"):
        if not 0 < alerts[key] < 1:
            raise ValuesError(f"metrics.alerts.{key} must be between 0 and 1, got {alerts[key]}")
    if not _DNS_1123.fullmatch(alerts["name"]):
        raise ValuesError(f"metrics.alerts.name {alerts['name']!r} must be a DNS-1123 name")
    if not board["sidecarLabel"]:
        raise ValuesError("metrics.dashboard.sidecarLabel must not be empty")


def _check_job(values: dict[str, Any], job: str) -> None:
    name, nodes = values[job]["name"], values[job]["nodes"]
    # Pods and their Services are named <name>-worker-<index>: a DNS label of at most 63.
    longest = len(f"{name}-worker-{max(nodes['max'] - 1, 0)}")
    if not _DNS_1035.fullmatch(name) or longest > 63:
        raise ValuesError(
            f"{job}.name {name!r} must be a DNS-1035 label (lowercase letters, digits, '-', "
            "starting with a letter) short enough that <name>-worker-<index> fits in 63 characters"
        )
    if not 1 <= nodes["min"] <= nodes["replicas"] <= nodes["max"]:
        raise ValuesError(
            f"{job}.nodes must satisfy 1 <= min <= replicas <= max, got min={nodes['min']} "
            f"replicas={nodes['replicas']} max={nodes['max']}"
        )
    if values[job]["preset"] not in ("imagenet", "small"):
        raise ValuesError(f"{job}.preset must be imagenet or small, got {values[job]['preset']!r}")
    check_training_config(values, job)


def check_training_config(values: dict[str, Any], job: str) -> None:
    """Load the rendered trainer config through the trainer's own loader (keys and types)."""
    from jcl_k8s.config import ConfigError, load_config

    text = yaml.safe_dump(training_config(values, job), sort_keys=False)
    handle, path = tempfile.mkstemp(suffix=".yaml", prefix=f"jcl-{job}-")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        load_config(job, values[job]["preset"], [path])
    except ConfigError as error:
        raise ValuesError(f"{job}.training: {error}") from None
    finally:
        os.unlink(path)


# ---------------------------------------------------------------------------- YAML


class _Dumper(yaml.SafeDumper):
    """Block style, multi-line strings as `|` literals (the ConfigMap's file)."""


def _str(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(obj: dict[str, Any]) -> str:
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)


def to_stream(objects: list[tuple[str, dict[str, Any]]]) -> str:
    """A YAML stream for `kubectl apply -f -`."""
    return "".join(f"---\n# Source: {name}\n{to_yaml(obj)}" for name, obj in objects)


def manifest_files(objects: list[tuple[str, dict[str, Any]]]) -> dict[str, str]:
    """The committed manifests/ folder: one file per object, values.yaml, kustomization.yaml,
    and the dashboard's JSON for import by hand."""
    files = {name: HEADER + to_yaml(obj) for name, obj in objects}
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [name for name, _ in objects],
    }
    files["kustomization.yaml"] = HEADER + to_yaml(kustomization)
    files["values.yaml"] = defaults_text()
    files[DASHBOARD_JSON_FILE] = dashboard.dashboard_json()
    return files


def write_manifests(directory: str | Path, objects: list[tuple[str, dict[str, Any]]]) -> list[Path]:
    """Write `manifest_files` into `directory`; returns the paths written."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in manifest_files(objects).items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text, encoding="utf-8")
        written.append(out / name)
    return written
