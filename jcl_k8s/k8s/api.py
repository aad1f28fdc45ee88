"""`jcl-k8s submit` and `jcl-k8s status`: the cluster side, through the `kubernetes` client.

submit applies objects with server-side apply (PATCH, `application/apply-patch+yaml`, field
manager `jcl-k8s`, strict field validation), optionally as a server dry run. status reads a
PyTorchJob's conditions and replica counts, its pods, and from the run URL (the job's
`jcl-k8s/output-url` annotation) the newest committed checkpoint and the last logged step.

Every API error becomes one line naming the object and what to do (`ClusterError`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from urllib3.exceptions import HTTPError

from jcl_k8s.errors import UserError

FIELD_MANAGER = "jcl-k8s"
APPLY_CONTENT_TYPE = "application/apply-patch+yaml"
OUTPUT_URL_ANNOTATION = "jcl-k8s/output-url"
IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")

# (apiVersion, kind) -> plural of a custom resource, and what provides it.
CUSTOM_RESOURCES = {
    ("kubeflow.org/v1", "PyTorchJob"): ("pytorchjobs", "the Kubeflow training operator (v1)"),
    ("monitoring.coreos.com/v1", "PodMonitor"): (
        "podmonitors", "the prometheus-operator CRDs (or set metrics.podMonitor.enabled=false)"
    ),
    ("monitoring.coreos.com/v1", "PrometheusRule"): (
        "prometheusrules", "the prometheus-operator CRDs (or set metrics.alerts.enabled=false)"
    ),
}
CORE_RESOURCES = {"ConfigMap": "config_map", "ServiceAccount": "service_account"}


class ClusterError(UserError):
    """The cluster cannot be reached, or refused a request; one line saying which and why."""


@dataclass
class Cluster:
    api_client: Any
    namespace: str

    @classmethod
    def connect(
        cls, kubeconfig: str | None = None, context: str | None = None,
        namespace: str | None = None,
    ) -> Cluster:
        """From a kubeconfig (given, $KUBECONFIG or ~/.kube/config), else in-cluster config."""
        from kubernetes import client, config

        configuration = client.Configuration()
        # The client reads $KUBECONFIG once, at import; read it now instead.
        default_file = os.environ.get("KUBECONFIG", "~/.kube/config").split(os.pathsep)[0]
        config_file = kubeconfig or os.path.expanduser(default_file)
        try:
            if kubeconfig or context or os.path.exists(config_file):
                config.load_kube_config(
                    config_file=config_file, context=context, client_configuration=configuration
                )
                contexts, active = config.list_kube_config_contexts(config_file=config_file)
                if context:
                    active = next(c for c in contexts if c["name"] == context)
                found = (active or {}).get("context", {}).get("namespace")
            else:
                config.load_incluster_config(client_configuration=configuration)
                found = IN_CLUSTER_NAMESPACE.read_text().strip()
        except (config.ConfigException, OSError, StopIteration) as error:
            raise ClusterError(f"no usable Kubernetes configuration: {error}") from None
        return cls(client.ApiClient(configuration), namespace or found or "default")


def submit(
    cluster: Cluster, objects: list[dict[str, Any]], dry_run: bool = False, force: bool = False
) -> Iterator[str]:
    """Server-side apply each object in order; yields one line per object applied."""
    suffix = " (server dry run)" if dry_run else ""
    for obj in objects:
        applied = apply(cluster, obj, dry_run=dry_run, force=force)
        version = (applied.get("metadata") or {}).get("resourceVersion", "")
        version = f" (resourceVersion {version})" if version and not dry_run else ""
        yield f"{_ref(obj)} applied{suffix}{version}"


def apply(
    cluster: Cluster, obj: dict[str, Any], dry_run: bool = False, force: bool = False
) -> dict[str, Any]:
    """One server-side apply; the object as the server returned it."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    namespace = _namespace(cluster, obj)
    body = {**obj, "metadata": {**obj["metadata"], "namespace": namespace}}
    options = {
        "field_manager": FIELD_MANAGER,
        "field_validation": "Strict",
        "force": force or None,
        "dry_run": "All" if dry_run else None,
        "_content_type": APPLY_CONTENT_TYPE,
    }
    name, kind = obj["metadata"]["name"], obj["kind"]
    try:
        if (obj["apiVersion"], kind) in CUSTOM_RESOURCES:
            group, version = obj["apiVersion"].split("/")
            plural, _ = CUSTOM_RESOURCES[(obj["apiVersion"], kind)]
            return client.CustomObjectsApi(cluster.api_client).patch_namespaced_custom_object(
                group, version, namespace, plural, name, body, **options
            )
        if obj["apiVersion"] == "v1" and kind in CORE_RESOURCES:
            method = getattr(client.CoreV1Api(cluster.api_client),
                             f"patch_namespaced_{CORE_RESOURCES[kind]}")
            result = method(name, namespace, body, **options)
            return cluster.api_client.sanitize_for_serialization(result)
    except ApiException as error:
        raise ClusterError(explain(error, obj)) from None
    except (OSError, HTTPError) as error:
        raise ClusterError(f"cannot reach the Kubernetes API server: {_short(error)}") from None
    raise ClusterError(f"{_ref(obj)}: submit does not know how to apply {obj['apiVersion']} {kind}")


def _short(error: Exception) -> str:
    reason = getattr(error, "reason", None) or error
    return " ".join(str(reason).split())


def _namespace(cluster: Cluster, obj: dict[str, Any]) -> str:
    return obj["metadata"].get("namespace") or cluster.namespace


def _ref(obj: dict[str, Any]) -> str:
    return f"{obj['kind'].lower()}/{obj['metadata']['name']}"


def explain(error: Any, obj: dict[str, Any] | None = None, what: str = "") -> str:
    """An ApiException as one line: what was refused, the server's reason, what to do."""
    subject = what or (_ref(obj) if obj else "request")
    try:
        status = json.loads(error.body or "{}")
    except (TypeError, ValueError):
        status = {}
    message = " ".join(str(status.get("message") or error.reason or "").split())
    code = error.status
    if code == 401:
        return f"{subject}: unauthorized (HTTP 401): {message}; check your kubeconfig credentials"
    if code == 403:
        return (
            f"{subject}: forbidden (HTTP 403): {message}; ask for RBAC permission to "
            "patch this kind in this namespace"
        )
    if code == 404:
        hint = ""
        if obj and (obj["apiVersion"], obj["kind"]) in CUSTOM_RESOURCES and (
            "could not find the requested resource" in message or not message
        ):
            hint = f"; is {CUSTOM_RESOURCES[(obj['apiVersion'], obj['kind'])][1]} installed?"
        elif "namespaces" in message:
            hint = "; create the namespace or pass --namespace"
        return f"{subject}: not found (HTTP 404): {message}{hint}"
    if code == 409:
        return (
            f"{subject}: conflict (HTTP 409): {message}; another field manager owns these "
            "fields: rerun with --force-conflicts to take them over"
        )
    if code == 422:
        causes = (status.get("details") or {}).get("causes") or []
        fields = "; ".join(
            f"{c.get('field', '?')}: {c.get('message', '')}".strip() for c in causes
        )
        detail = f" ({fields})" if fields and fields not in message else ""
        return f"{subject}: invalid (HTTP 422): {message}{detail}"
    return f"{subject}: HTTP {code} {error.reason or ''}: {message}".rstrip(": ")


def job_status(cluster: Cluster, name: str) -> Iterator[str]:
    """Lines describing a PyTorchJob: conditions, replicas, pods, checkpoint and last step."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    ref = f"pytorchjob/{name}"
    try:
        job = client.CustomObjectsApi(cluster.api_client).get_namespaced_custom_object(
            "kubeflow.org", "v1", cluster.namespace, "pytorchjobs", name
        )
        pods = client.CoreV1Api(cluster.api_client).list_namespaced_pod(
            cluster.namespace, label_selector=f"training.kubeflow.org/job-name={name}"
        )
    except ApiException as error:
        job_ref = {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
                   "metadata": {"name": name}}
        raise ClusterError(explain(error, job_ref, what=f"{ref} in {cluster.namespace}")) from None
    except (OSError, HTTPError) as error:
        raise ClusterError(f"cannot reach the Kubernetes API server: {_short(error)}") from None

    status = job.get("status") or {}
    yield f"{ref} (namespace {cluster.namespace})"
    conditions = status.get("conditions") or []
    yield "conditions:" if conditions else "conditions: none yet"
    for condition in conditions:
        yield (
            f"  {condition.get('type')}={condition.get('status')}  "
            f"{condition.get('reason', '')}  {condition.get('lastTransitionTime', '')}  "
            f"{condition.get('message', '')}".rstrip()
        )
    for kind, counts in (status.get("replicaStatuses") or {}).items():
        states = ", ".join(f"{state} {counts.get(state, 0)}"
                           for state in ("active", "succeeded", "failed"))
        yield f"replicas {kind}: {states}"
    for pod in sorted(pods.items, key=lambda p: p.metadata.name):
        yield f"  pod {_pod_line(pod)}"
    run_url = ((job.get("metadata") or {}).get("annotations") or {}).get(OUTPUT_URL_ANNOTATION)
    if run_url:
        yield from run_progress(run_url)
    else:
        yield f"run: unknown (no {OUTPUT_URL_ANNOTATION} annotation on the job)"


def _pod_line(pod: Any) -> str:
    statuses = (pod.status.container_statuses if pod.status else None) or []
    restarts = sum(s.restart_count or 0 for s in statuses)
    line = f"{pod.metadata.name}: {pod.status.phase if pod.status else '?'}, restarts {restarts}"
    for container in statuses:
        terminated = container.last_state.terminated if container.last_state else None
        if terminated is not None:
            line += f", last exit {terminated.exit_code} ({terminated.reason or 'no reason'})"
    return line


def run_progress(run_url: str) -> Iterator[str]:
    """The run's newest committed checkpoint, last logged step, and whether it finished."""
    from jcl_k8s import checkpoint, storage

    yield f"run {run_url}:"
    try:
        committed = checkpoint.committed(run_url)
        yield f"  newest committed checkpoint: {committed[-1] if committed else 'none yet'}"
        metrics_url = storage.join(run_url, "metrics.jsonl")
        if storage.exists(metrics_url):
            lines = [line for line in storage.read_text(metrics_url).splitlines() if line.strip()]
            if lines:
                last = json.loads(lines[-1])
                yield (
                    f"  last logged step: {last.get('global_step')} (epoch "
                    f"{last.get('epoch', 0) + 1}, loss {last.get('loss', float('nan')):.4f})"
                )
        finished = storage.exists(storage.join(run_url, checkpoint.FINAL_FILE))
        yield f"  finished: {'yes' if finished else 'no'}"
    except (UserError, OSError, ValueError) as error:
        yield f"  cannot read the run: {' '.join(str(error).split())}"
