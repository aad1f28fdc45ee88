"""Offline checks of Kubernetes objects, so a wrong field is found before a GPU queue wait.

Three layers, each returning a list of one-line problems (empty when all is well):
- `schema_problems`: the official schemas. Custom resources (PyTorchJob, PodMonitor, ...)
  against the `openAPIV3Schema` of their CRD files in a folder (e.g. ../shared/schemas);
  core objects, every object's metadata and the PyTorchJob's pod template against the
  Kubernetes OpenAPI schemas of `kubernetes-validate`. Both are strict: a field the schema
  does not name is a problem (the API server would drop it from a custom resource silently).
- `webhook_problems`: the rules the training operator's validating webhook enforces on a
  PyTorchJob but its CRD schema lacks.
- `practice_problems`: what a PyTorchJob needs to run elastic torchrun well (an explicit
  nprocPerNode, a rendezvous id, named ports, ...), each with the reason.
- `rule_problems`: the shape of a PrometheusRule (its CRD is not among the schema files, so
  this stands in for it); `promtool check rules` on its `spec` checks the expressions.

jsonschema and kubernetes-validate are imported only by `schema_problems` (test extras).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

KUBERNETES_VERSION = "1.30"
"""Oldest Kubernetes the manifests target; core objects are checked against its schemas."""

_DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_PORT_NAME = re.compile(r"(?=.*[a-z])[a-z0-9]([-a-z0-9]*[a-z0-9])?")
REPLICA_TYPES = ("Master", "Worker")
PROMETHEUS_RULE = ("monitoring.coreos.com/v1", "PrometheusRule")
_DURATION = re.compile(r"([0-9]+(ms|s|m|h|d|w|y))+")


def problems(objects: Iterable[dict[str, Any]], schema_dir: Path | None = None) -> list[str]:
    """Every layer for every object; schemas only when `schema_dir` is given."""
    found: list[str] = []
    for obj in objects:
        if not isinstance(obj, dict) or not obj.get("apiVersion") or not obj.get("kind"):
            found.append(f"{str(obj)[:60]!r}: not a Kubernetes object (no apiVersion and kind)")
            continue
        if schema_dir is not None:
            found += schema_problems(obj, schema_dir)
        found += webhook_problems(obj)
        found += practice_problems(obj)
        found += rule_problems(obj)
    return found


def describe(obj: dict[str, Any]) -> str:
    return f"{obj.get('kind', '?')}/{(obj.get('metadata') or {}).get('name', '?')}"


# ---------------------------------------------------------------------------- schemas


def schema_problems(obj: dict[str, Any], schema_dir: Path) -> list[str]:
    """Problems of `obj` against the official schema of its kind (strict)."""
    import jsonschema

    crd = crd_schemas(Path(schema_dir)).get((obj.get("apiVersion"), obj.get("kind")))
    if crd is None and (obj.get("apiVersion"), obj.get("kind")) == PROMETHEUS_RULE:
        # No CRD file: its metadata here, its spec in rule_problems.
        return _core_problems({"apiVersion": "v1", "kind": "ConfigMap",
                               "metadata": obj.get("metadata") or {}}, label=describe(obj))
    if crd is None:
        return _core_problems(obj)
    found = [
        f"{describe(obj)}: {_where(error.absolute_path)}{error.message}"
        for error in jsonschema.Draft7Validator(crd).iter_errors(obj)
    ]
    found += [f"{describe(obj)}: {message}" for message in unknown_fields(obj, crd)]
    # A custom resource's schema leaves metadata open: check it as any object's metadata.
    found += _core_problems({"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]},
                            label=describe(obj))
    if obj.get("kind") == "PyTorchJob":
        for kind, spec in (obj.get("spec", {}).get("pytorchReplicaSpecs") or {}).items():
            template = {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": "template"},
                "template": spec.get("template", {}),
            }
            found += _core_problems(template, label=f"{describe(obj)} {kind} template")
    return found


@lru_cache(maxsize=4)
def crd_schemas(schema_dir: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> openAPIV3Schema, from every CRD file in `schema_dir`."""
    schemas = {}
    for path in sorted(schema_dir.glob("*.yaml")):
        # The CRD files are large (hundreds of kB): the C loader, where present, is ~10x faster.
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        for doc in yaml.load_all(path.read_text(encoding="utf-8"), Loader=loader):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = doc["spec"]["group"], doc["spec"]["names"]["kind"]
            for version in doc["spec"]["versions"]:
                schema = version.get("schema", {}).get("openAPIV3Schema")
                if schema:
                    schemas[(f"{group}/{version['name']}", kind)] = schema
    return schemas


def unknown_fields(instance: Any, schema: dict[str, Any], at: str = "") -> list[str]:
    """Fields a structural schema does not name (it would prune them); nested paths."""
    found = []
    if isinstance(instance, dict) and schema.get("type") == "object":
        properties = schema.get("properties")
        additional = schema.get("additionalProperties")
        open_ = schema.get("x-kubernetes-preserve-unknown-fields") or additional is True
        for key, value in instance.items():
            path = f"{at}.{key}" if at else str(key)
            if properties is not None and key in properties:
                found += unknown_fields(value, properties[key], path)
            elif isinstance(additional, dict):
                found += unknown_fields(value, additional, path)
            elif properties is not None and not open_ and not (at == "" and key in _TOP):
                found.append(f"{path}: unknown field (known: {', '.join(sorted(properties))})")
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(instance):
            found += unknown_fields(item, schema["items"], f"{at}[{i}]")
    return found


_TOP = ("apiVersion", "kind", "metadata")


def _core_problems(obj: dict[str, Any], label: str | None = None) -> list[str]:
    import kubernetes_validate

    label = label or describe(obj)
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{label}: {_where(error.absolute_path)}{error.message}"]
    except kubernetes_validate.SchemaNotFoundError as error:
        return [f"{label}: no schema: {error.message}"]
    return []


def _where(path: Iterable[Any]) -> str:
    parts = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
    return f"{parts}: " if parts else ""


# ---------------------------------------------------------------------------- webhook rules


def webhook_problems(obj: dict[str, Any]) -> list[str]:
    """The PyTorchJob validating webhook's rules (training operator v1.9)."""
    if obj.get("kind") != "PyTorchJob":
        return []
    found = []
    name = obj.get("metadata", {}).get("name", "")
    if not (_DNS_1035.fullmatch(name) and len(name) <= 63):
        found.append(f"name {name!r} is not a DNS-1035 label (the webhook rejects it)")
    spec = obj.get("spec") or {}
    replicas = spec.get("pytorchReplicaSpecs") or {}
    for kind, replica in replicas.items():
        if kind not in REPLICA_TYPES:
            found.append(f"replica type {kind!r} is not allowed: only Master and Worker")
            continue
        containers = ((replica.get("template") or {}).get("spec") or {}).get("containers") or []
        if not any(c.get("name") == "pytorch" for c in containers):
            found.append(f"{kind}: no container is named 'pytorch' (the operator requires one)")
        for container in containers:
            if not container.get("image"):
                found.append(f"{kind}: container {container.get('name')!r} has no image")
    if "Master" in replicas and replicas["Master"].get("replicas", 1) != 1:
        found.append("Master.replicas must be exactly 1")
    if "Worker" in replicas and replicas["Worker"].get("replicas", 1) < 1:
        found.append("Worker.replicas must be at least 1")
    elastic = spec.get("elasticPolicy")
    if elastic is not None and "Worker" not in replicas:
        found.append("elasticPolicy needs a Worker replica spec")
    if elastic and elastic.get("nProcPerNode") is not None and spec.get("nprocPerNode") is not None:
        found.append("set spec.nprocPerNode or the deprecated elasticPolicy.nProcPerNode, not both")
    return [f"{describe(obj)}: {problem}" for problem in found]


# ---------------------------------------------------------------------------- practice


def practice_problems(obj: dict[str, Any]) -> list[str]:
    """What an elastic PyTorchJob needs beyond what the operator accepts, with the reason."""
    if obj.get("kind") != "PyTorchJob":
        return []
    found = []
    spec = obj.get("spec") or {}
    nproc = spec.get("nprocPerNode")
    if nproc is None or not str(nproc).isdigit():
        found.append(
            f"spec.nprocPerNode is {nproc!r}: set it to the pod's GPU count ('1' on CPU); "
            "'auto' starts one process per host core on CPU"
        )
    elastic = spec.get("elasticPolicy") or {}
    if not elastic.get("rdzvId"):
        found.append("elasticPolicy.rdzvId is unset: torchrun then uses the shared id 'none'")
    if not elastic.get("maxRestarts"):
        found.append(
            "elasticPolicy.maxRestarts is unset or 0: every peer loss or scale event then "
            "fails the pod"
        )
    if "standalone" in elastic:
        found.append("elasticPolicy.standalone makes the operator set PET_STANDALONE='' "
                     "which torchrun cannot parse")
    run_policy = spec.get("runPolicy") or {}
    if run_policy.get("backoffLimit") is None:
        found.append("runPolicy.backoffLimit is unset: failing containers restart forever")
    worker = (spec.get("pytorchReplicaSpecs") or {}).get("Worker") or {}
    if worker.get("restartPolicy") == "Always":
        found.append("Worker.restartPolicy Always reruns a worker that finished")
    if elastic:
        name = obj.get("metadata", {}).get("name", "")
        longest = f"{name}-worker-{max(int(elastic.get('maxReplicas', 1)) - 1, 0)}"
        if len(longest) > 63:
            found.append(f"pod and Service name {longest!r} is longer than 63 characters")
    pod = (worker.get("template") or {}).get("spec") or {}
    found += _container_problems(pod, nproc)
    return [f"{describe(obj)}: {problem}" for problem in found]


def _container_problems(pod: dict[str, Any], nproc: Any) -> list[str]:
    found = []
    container = next((c for c in pod.get("containers") or [] if c.get("name") == "pytorch"), None)
    if container is None:
        return found
    for port in container.get("ports") or []:
        if not _PORT_NAME.fullmatch(str(port.get("name", ""))) or len(port.get("name", "")) > 15:
            found.append(
                f"port {port.get('containerPort')} needs a name (at most 15 lowercase letters, "
                "digits, '-'): the operator keys the per-pod Service's ports by name"
            )
    if container.get("readinessProbe"):
        found.append(
            "the pytorch container has a readinessProbe: worker-0's DNS name appears only "
            "once it is Ready, which delays every other worker's rendezvous"
        )
    limits = (container.get("resources") or {}).get("limits") or {}
    gpus = next((v for k, v in limits.items() if k.endswith("/gpu")), None)
    if gpus is not None and str(nproc).isdigit() and int(gpus) != int(nproc):
        found.append(f"nprocPerNode {nproc} differs from the pod's {gpus} GPUs")
    shm = [m for m in container.get("volumeMounts") or [] if m.get("mountPath") == "/dev/shm"]
    volumes = {v.get("name"): v for v in pod.get("volumes") or []}
    if not shm or (volumes.get(shm[0].get("name")) or {}).get("emptyDir", {}).get(
        "medium"
    ) != "Memory":
        found.append("/dev/shm is not a memory emptyDir: DataLoader workers get the 64 MiB default")
    grace = pod.get("terminationGracePeriodSeconds")
    env = {e.get("name"): e.get("value") for e in container.get("env") or []}
    shutdown = int(env.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT") or 30)
    if grace is None or grace <= shutdown:
        found.append(
            f"terminationGracePeriodSeconds {grace} does not exceed torchrun's shutdown timeout "
            f"({shutdown} s): the kubelet kills the trainers while they save"
        )
    return found


# ---------------------------------------------------------------------------- PrometheusRule


def rule_problems(obj: dict[str, Any]) -> list[str]:
    """A PrometheusRule's shape, as the prometheus-operator's CRD and webhook would check it."""
    if obj.get("kind") != PROMETHEUS_RULE[1]:
        return []
    found = []
    if obj.get("apiVersion") != PROMETHEUS_RULE[0]:
        found.append(f"apiVersion is {obj.get('apiVersion')!r}, not {PROMETHEUS_RULE[0]}")
    metadata = obj.get("metadata") or {}
    name = str(metadata.get("name", ""))
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", name) or len(name) > 253:
        found.append(f"metadata.name {name!r} is not a DNS-1123 name")
    spec = obj.get("spec") or {}
    if set(spec) != {"groups"} or not isinstance(spec["groups"], list) or not spec["groups"]:
        return [f"{describe(obj)}: {p}" for p in [*found, "spec must hold only a list `groups`"]]
    names = [group.get("name") for group in spec["groups"]]
    if len(set(names)) != len(names):
        found.append(f"group names repeat: {names}")
    for i, group in enumerate(spec["groups"]):
        where = f"spec.groups[{i}]"
        unknown = set(group) - {"name", "interval", "rules", "limit", "labels",
                                "query_offset", "partial_response_strategy"}
        if unknown:
            found.append(f"{where}: unknown fields {sorted(unknown)}")
        if not group.get("name"):
            found.append(f"{where}: no name")
        for j, rule in enumerate(group.get("rules") or []):
            found += [f"{where}.rules[{j}]: {p}" for p in _one_rule_problems(rule)]
    return [f"{describe(obj)}: {problem}" for problem in found]


def _one_rule_problems(rule: dict[str, Any]) -> list[str]:
    found = []
    if ("alert" in rule) == ("record" in rule):
        found.append("needs exactly one of alert and record")
    if not isinstance(rule.get("expr"), str) or not rule["expr"].strip():
        found.append("expr must be a non-empty string (PromQL)")
    unknown = set(rule) - {"alert", "record", "expr", "for", "keep_firing_for", "labels",
                           "annotations"}
    if unknown:
        found.append(f"unknown fields {sorted(unknown)}")
    for key in ("for", "keep_firing_for"):
        if key in rule and not _DURATION.fullmatch(str(rule[key])):
            found.append(f"{key} {rule[key]!r} is not a duration such as 5m")
    for key in ("labels", "annotations"):
        entries = rule.get(key) or {}
        if not all(isinstance(v, str) for v in entries.values()):
            found.append(f"{key} values must be strings")
    return found
