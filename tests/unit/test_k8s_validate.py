"""Every rendered object validates against its official schema and the operator's webhook rules."""

import copy

import pytest

from jcl_k8s.k8s.render import render_values
from jcl_k8s.k8s.validate import (
    practice_problems,
    problems,
    rule_problems,
    schema_problems,
    webhook_problems,
)
from tests.conftest import shared_path

pytest.importorskip("jsonschema")
pytest.importorskip("kubernetes_validate")

VARIANTS = {
    "defaults": [],
    "cpu": ["pod.gpus=0", "pod.cpu=2", "pod.memory=4Gi", "s3.secretName=",
            "pod.tolerations[0].key=spot", "pod.tolerations[0].operator=Exists",
            "pod.nodeSelector.pool=cpu", "pod.priorityClassName=low", "namespace=ml",
            "restart.activeDeadlineSeconds=86400", "restart.ttlSecondsAfterFinished=600",
            "image.pullSecrets={regcred}", "pod.env[0].name=LOGLEVEL", "pod.env[0].value=DEBUG",
            "serviceAccount.annotations.eks\\.amazonaws\\.com/role-arn=arn:aws:iam::1:role/r"],
    "big": ["pod.gpus=8", "pod.extraResources.vpc\\.amazonaws\\.com/efa=4",
            "pretrain.nodes.replicas=16", "pretrain.nodes.max=32", "pretrain.nodes.min=8",
            "pod.cpuLimit=96", "restart.policy=ExitCode"],
}


@pytest.fixture(scope="module")
def schemas():
    return shared_path("schemas")


def job(objects, name="jcl-pretrain"):
    return next(o for o in objects if o["kind"] == "PyTorchJob" and o["metadata"]["name"] == name)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_rendered_object_is_valid(schemas, variant):
    objects = [obj for _, obj in render_values(sets=VARIANTS[variant])]
    assert problems(objects, schemas) == []


def test_schema_finds_unknown_fields_and_bad_values(schemas):
    bad = copy.deepcopy(job([o for _, o in render_values()]))
    bad["spec"]["nprocsPerNode"] = "1"
    bad["spec"]["elasticPolicy"]["maxRestarts"] = "many"
    pod = bad["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    pod["containers"][0]["resources"]["limits"]["memory"] = "lots"
    pod["containers"][0]["ports"][1]["nmae"] = "x"
    found = "\n".join(schema_problems(bad, schemas))
    assert "spec.nprocsPerNode: unknown field" in found
    assert "maxRestarts: 'many' is not of type 'integer'" in found
    assert "limits.memory: 'lots' does not match" in found
    assert "ports[1].nmae: unknown field" in found


def test_core_objects_are_checked_strictly(schemas):
    config_map = next(o for _, o in render_values() if o["kind"] == "ConfigMap")
    config_map = {**config_map, "immutable": "yes", "binaryData": {"a": 1}}
    assert schema_problems(config_map, schemas)
    account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "x"},
               "automountToken": False}
    assert "automountToken" in schema_problems(account, schemas)[0]


def test_podmonitor_needs_named_endpoints(schemas):
    monitor = next(o for _, o in render_values() if o["kind"] == "PodMonitor")
    monitor = copy.deepcopy(monitor)
    monitor["spec"]["podMetricsEndpoints"][0]["prot"] = "metrics-0"
    assert any("prot: unknown field" in p for p in schema_problems(monitor, schemas))


def base_job():
    return copy.deepcopy(job([o for _, o in render_values()]))


def containers(obj, kind="Worker"):
    return obj["spec"]["pytorchReplicaSpecs"][kind]["template"]["spec"]["containers"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda j: j["metadata"].update(name="Jcl_Pretrain"), "DNS-1035"),
        (lambda j: j["spec"]["pytorchReplicaSpecs"].update(
            Chief=j["spec"]["pytorchReplicaSpecs"]["Worker"]), "only Master and Worker"),
        (lambda j: containers(j)[0].update(name="trainer"), "named 'pytorch'"),
        (lambda j: containers(j)[0].pop("image"), "has no image"),
        (lambda j: j["spec"]["pytorchReplicaSpecs"].update(
            Master={**copy.deepcopy(j["spec"]["pytorchReplicaSpecs"]["Worker"]), "replicas": 2}),
         "Master.replicas must be exactly 1"),
        (lambda j: j["spec"]["pytorchReplicaSpecs"]["Worker"].update(replicas=0),
         "Worker.replicas must be at least 1"),
        (lambda j: j["spec"]["elasticPolicy"].update(nProcPerNode=4), "not both"),
    ],
)
def test_webhook_rules(change, message):
    obj = base_job()
    assert webhook_problems(obj) == []
    change(obj)
    assert any(message in p for p in webhook_problems(obj)), webhook_problems(obj)


def test_elastic_policy_needs_a_worker():
    obj = base_job()
    replicas = obj["spec"]["pytorchReplicaSpecs"]
    replicas["Master"] = {**replicas.pop("Worker"), "replicas": 1}
    assert any("elasticPolicy needs a Worker" in p for p in webhook_problems(obj))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda j: j["spec"].update(nprocPerNode="auto"), "'auto' starts one process per host"),
        (lambda j: j["spec"]["elasticPolicy"].pop("rdzvId"), "shared id 'none'"),
        (lambda j: j["spec"]["elasticPolicy"].pop("maxRestarts"), "maxRestarts is unset"),
        (lambda j: j["spec"]["elasticPolicy"].update(standalone=True), "PET_STANDALONE"),
        (lambda j: j["spec"]["runPolicy"].pop("backoffLimit"), "restart forever"),
        (lambda j: j["spec"]["pytorchReplicaSpecs"]["Worker"].update(restartPolicy="Always"),
         "reruns a worker"),
        (lambda j: containers(j)[0]["ports"][1].pop("name"), "needs a name"),
        (lambda j: containers(j)[0].update(readinessProbe={"tcpSocket": {"port": 9400}}),
         "readinessProbe"),
        (lambda j: j["spec"].update(nprocPerNode="2"), "differs from the pod's 4 GPUs"),
        (lambda j: j["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"].update(
            terminationGracePeriodSeconds=30), "does not exceed torchrun's shutdown timeout"),
        (lambda j: containers(j)[0].update(volumeMounts=[]), "/dev/shm is not a memory emptyDir"),
    ],
)
def test_practice_rules(change, message):
    obj = base_job()
    assert practice_problems(obj) == []
    change(obj)
    assert any(message in p for p in practice_problems(obj)), practice_problems(obj)


def rendered_rule():
    return copy.deepcopy(next(o for _, o in render_values() if o["kind"] == "PrometheusRule"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.update(apiVersion="monitoring.coreos.com/v1beta1"), "apiVersion is"),
        (lambda r: r["metadata"].update(name="Jcl_Rules"), "not a DNS-1123 name"),
        (lambda r: r["spec"].update(rules=[]), "only a list `groups`"),
        (lambda r: r["spec"]["groups"].append(copy.deepcopy(r["spec"]["groups"][0])),
         "group names repeat"),
        (lambda r: r["spec"]["groups"][1]["rules"][0].update(record="x"), "exactly one of"),
        (lambda r: r["spec"]["groups"][1]["rules"][0].update({"for": "ten minutes"}),
         "not a duration"),
        (lambda r: r["spec"]["groups"][1]["rules"][0].update(expresion="up"), "unknown fields"),
        (lambda r: r["spec"]["groups"][1]["rules"][0]["labels"].update(page=True),
         "must be strings"),
    ],
)
def test_prometheus_rule_shape(change, message):
    rule = rendered_rule()
    assert rule_problems(rule) == []
    change(rule)
    assert any(message in p for p in rule_problems(rule)), rule_problems(rule)
