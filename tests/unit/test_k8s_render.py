"""Render: the committed manifests are the defaults' render; overrides land where expected."""

from pathlib import Path

import pytest
import yaml

from jcl_k8s.config import load_config
from jcl_k8s.k8s.entrypoint import ENTRYPOINT
from jcl_k8s.k8s.render import (
    CONFIG_DIR,
    manifest_files,
    render,
    render_values,
    rendezvous_id,
    to_stream,
)
from jcl_k8s.k8s.values import ValuesError, defaults_text, load_values

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"


def objects(**kwargs):
    return {obj["kind"] + "/" + obj["metadata"]["name"]: obj for _, obj in render_values(**kwargs)}


def container(job):
    return job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]


def test_committed_manifests_are_the_render_of_the_defaults():
    expected = manifest_files(render_values())
    for name, text in expected.items():
        path = MANIFESTS / name
        assert path.exists(), f"{path} is missing: run `jcl-k8s render --write manifests`"
        assert path.read_text() == text, (
            f"{path} differs from the render of the defaults: "
            "run `jcl-k8s render --write manifests`"
        )


def test_no_stale_rendered_files_in_manifests():
    expected = set(manifest_files(render_values()))
    rendered = {str(p.relative_to(MANIFESTS)) for p in MANIFESTS.rglob("*.yaml")
                if "Rendered by " in p.read_text()}
    assert rendered <= expected
    assert {str(p.relative_to(MANIFESTS)) for p in MANIFESTS.rglob("*.json")} <= expected


def test_packaged_values_equal_the_committed_values():
    assert (MANIFESTS / "values.yaml").read_text() == defaults_text()


def test_stream_is_one_document_per_object():
    rendered = render_values()
    documents = [d for d in yaml.safe_load_all(to_stream(rendered)) if d]
    assert documents == [obj for _, obj in rendered]
    kinds = [d["kind"] for d in documents]
    assert kinds == ["ServiceAccount", "ConfigMap", "PyTorchJob", "PodMonitor", "ConfigMap",
                     "PyTorchJob", "PodMonitor", "PrometheusRule", "ConfigMap"]


def test_job_selection():
    names = [name for name, _ in render_values(job="pretrain")]
    assert names == ["serviceaccount.yaml", "pretrain-configmap.yaml", "pretrain-pytorchjob.yaml",
                     "pretrain-podmonitor.yaml", "prometheusrule.yaml",
                     "grafana/dashboard-configmap.yaml"]
    # The job-independent objects are the same whichever job is rendered.
    shared = {"prometheusrule.yaml", "grafana/dashboard-configmap.yaml"}
    for job in ("pretrain", "lincls"):
        assert {n: o for n, o in render_values(job=job) if n in shared} == {
            n: o for n, o in render_values() if n in shared
        }
    with pytest.raises(ValuesError, match="nothing to render"):
        render_values(sets=["lincls.enabled=false"], job="lincls")


def test_pytorchjob_design_rules():
    job = objects()["PyTorchJob/jcl-pretrain"]
    spec = job["spec"]
    assert spec["nprocPerNode"] == "4"
    elastic = spec["elasticPolicy"]
    assert elastic["rdzvBackend"] == "c10d"
    assert (elastic["minReplicas"], elastic["maxReplicas"]) == (1, 2)
    assert elastic["maxRestarts"] == 20
    assert elastic["rdzvId"].startswith("jcl-pretrain-")
    assert {c["key"] for c in elastic["rdzvConf"]} >= {"join_timeout", "last_call_timeout"}
    assert "standalone" not in elastic
    assert spec["runPolicy"] == {"cleanPodPolicy": "Running", "backoffLimit": 10}
    worker = spec["pytorchReplicaSpecs"]["Worker"]
    assert set(spec["pytorchReplicaSpecs"]) == {"Worker"}
    assert worker["restartPolicy"] == "OnFailure"
    pod = worker["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= 90 + 15
    main = container(job)
    assert main["name"] == "pytorch"
    assert main["command"] == list(ENTRYPOINT)
    assert main["args"][main["args"].index("--") + 1 :] == [
        "pretrain", "--preset", "imagenet", "--config", f"{CONFIG_DIR}/pretrain.yaml",
    ]
    assert all(port["name"] for port in main["ports"])
    assert main["ports"][0] == {"name": "pytorchjob-port", "containerPort": 23456,
                                "protocol": "TCP"}
    assert "readinessProbe" not in main
    assert main["envFrom"] == [{"secretRef": {"name": "jcl-s3"}}]
    assert not any("KEY" in e["name"] and "value" in e for e in main["env"])
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert volumes["config"]["configMap"]["name"] == "jcl-pretrain-config"
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_lincls_reads_the_pretrain_run():
    config = yaml.safe_load(objects()["ConfigMap/jcl-lincls-config"]["data"]["lincls.yaml"])
    assert config["pretrained"] == "s3://jcl-runs/jcl-pretrain"
    assert config["wait_for_pretrained"] == 3600
    assert config["data"]["url"] == "s3://jcl-data/imagenet"
    changed = objects(sets=["pretrain.training.output_url=s3://b/run2",
                            "pretrain.training.data.url=s3://b/data"])
    config = yaml.safe_load(changed["ConfigMap/jcl-lincls-config"]["data"]["lincls.yaml"])
    assert (config["pretrained"], config["data"]["url"]) == ("s3://b/run2", "s3://b/data")


@pytest.mark.parametrize("job", ["pretrain", "lincls"])
def test_configmap_is_a_config_the_trainer_loads(tmp_path, job):
    sets = [f"{job}.training.epochs=3", f"{job}.training.batch_size=64",
            f"{job}.training.model.arch=resnet18", f"{job}.training.data.image_size=96"]
    if job == "pretrain":
        sets += ["pretrain.training.k_crops=4", "pretrain.training.jcl_lambda=1.5",
                 "pretrain.training.lr=0.1"]
    name = f"jcl-{job}-config"
    text = objects(sets=sets)[f"ConfigMap/{name}"]["data"][f"{job}.yaml"]
    path = tmp_path / f"{job}.yaml"
    path.write_text(text)
    config = load_config(job, "imagenet", [str(path)])
    assert (config.epochs, config.batch_size, config.model.arch, config.data.image_size) == (
        3, 64, "resnet18", 96
    )
    assert config.metrics.port == 9400
    if job == "pretrain":
        assert (config.k_crops, config.jcl_lambda, config.lr) == (4, 1.5, 0.1)
    # Settings left null are the preset's: the small preset still applies to them.
    small = load_config(job, "small", [str(path)])
    assert small.data.cache_bytes and not config.data.cache_bytes


def test_overrides_land_where_expected(tmp_path):
    values_file = tmp_path / "cpu.yaml"
    values_file.write_text("""
namespace: research
pod:
  gpus: 0
  cpu: "4"
  memory: 8Gi
  tolerations: [{key: spot, operator: Exists, effect: NoSchedule}]
  priorityClassName: preemptible
s3:
  secretName: ""
serviceAccount:
  annotations: {eks.amazonaws.com/role-arn: "arn:aws:iam::1:role/jcl"}
""")
    rendered = objects(files=[str(values_file)], sets=["pretrain.nodes.replicas=3",
                                                        "pretrain.nodes.max=4",
                                                        "metrics.port=9500",
                                                        "image.tag=0.2.0"])
    job = rendered["PyTorchJob/jcl-pretrain"]
    main, pod = container(job), job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    assert job["metadata"]["namespace"] == "research"
    assert job["spec"]["nprocPerNode"] == "1"
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 3
    assert job["spec"]["elasticPolicy"]["maxReplicas"] == 4
    assert main["resources"] == {"requests": {"cpu": "4", "memory": "8Gi"},
                                 "limits": {"memory": "8Gi"}}
    assert pod["tolerations"] == [{"key": "spot", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["priorityClassName"] == "preemptible"
    assert "envFrom" not in main
    assert main["image"].endswith(":0.2.0")
    assert [p["containerPort"] for p in main["ports"]] == [23456, 9500]
    monitor = rendered["PodMonitor/jcl-pretrain"]
    assert monitor["metadata"]["namespace"] == "research"
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics-0"]
    assert rendered["PrometheusRule/jcl-training"]["metadata"]["namespace"] == "research"
    assert rendered["ConfigMap/jcl-dashboard"]["metadata"]["namespace"] == "research"
    account = rendered["ServiceAccount/jcl-k8s"]
    assert account["metadata"]["annotations"] == {
        "eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/jcl"
    }
    config = yaml.safe_load(rendered["ConfigMap/jcl-pretrain-config"]["data"]["pretrain.yaml"])
    assert config["metrics"]["port"] == 9500


def test_gpu_count_drives_processes_resources_and_metrics_ports():
    job = objects(sets=["pod.gpus=8"])["PyTorchJob/jcl-pretrain"]
    main = container(job)
    assert job["spec"]["nprocPerNode"] == "8"
    assert main["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert [p["name"] for p in main["ports"]][1:] == [f"metrics-{i}" for i in range(8)]


def test_metrics_off_drops_ports_and_monitoring():
    rendered = objects(sets=["metrics.port=0"])
    assert not {"PodMonitor", "PrometheusRule"} & {key.split("/")[0] for key in rendered}
    assert "ConfigMap/jcl-dashboard" not in rendered
    assert [p["name"] for p in container(rendered["PyTorchJob/jcl-pretrain"])["ports"]] == [
        "pytorchjob-port"
    ]


@pytest.mark.parametrize("gpus", [1, 4, 8])
def test_podmonitor_scrapes_every_metrics_port_of_its_job_s_pytorch_container(gpus):
    rendered = objects(sets=[f"pod.gpus={gpus}"])
    for name in ("jcl-pretrain", "jcl-lincls"):
        monitor, job = rendered[f"PodMonitor/{name}"], rendered[f"PyTorchJob/{name}"]
        assert monitor["spec"]["selector"] == {
            "matchLabels": {"training.kubeflow.org/job-name": name}
        }
        endpoints = monitor["spec"]["podMetricsEndpoints"]
        assert all(endpoint["honorLabels"] is True for endpoint in endpoints)
        ports = {p["name"]: p["containerPort"] for p in container(job)["ports"]}
        scraped = [endpoint["port"] for endpoint in endpoints]
        assert set(scraped) <= set(ports), "an endpoint names a port the container lacks"
        # One endpoint per training process: base port + local rank.
        assert sorted(ports[name] for name in scraped) == [9400 + i for i in range(gpus)]
        assert int(job["spec"]["nprocPerNode"]) == len(scraped)


def test_alert_and_dashboard_values_reach_their_objects():
    rendered = objects(sets=[
        "metrics.alerts.noProgressMinutes=7", "metrics.alerts.checkpointMaxAgeMinutes=30",
        "metrics.alerts.throughputDropRatio=0.25", "metrics.alerts.dataWaitShare=0.8",
        "metrics.alerts.restarts=5", "metrics.alerts.severity=page",
        "metrics.alerts.labels.release=kps", "metrics.alerts.name=jcl-alerts",
        "metrics.dashboard.namespace=monitoring", "metrics.dashboard.sidecarLabel=dash",
        "metrics.dashboard.sidecarLabelValue=yes", "metrics.dashboard.folder=Training",
    ])
    rule = rendered["PrometheusRule/jcl-alerts"]
    assert rule["metadata"]["labels"]["release"] == "kps"
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r}
    assert "[7m]" in alerts["JCLTrainingStalled"]["expr"]
    assert "> 1800" in alerts["JCLCheckpointTooOld"]["expr"]
    assert "< 0.25 *" in alerts["JCLThroughputDropped"]["expr"]
    assert alerts["JCLDataStarved"]["expr"].endswith("> 0.8")
    assert ">= 5" in alerts["JCLRepeatedRestarts"]["expr"]
    assert alerts["JCLDataStarved"]["labels"]["severity"] == "page"
    board = rendered["ConfigMap/jcl-dashboard"]["metadata"]
    assert board["namespace"] == "monitoring"
    assert board["labels"]["dash"] == "yes" and "grafana_dashboard" not in board["labels"]
    assert board["annotations"] == {"grafana_folder": "Training"}
    off = objects(sets=["metrics.alerts.enabled=false", "metrics.dashboard.enabled=false"])
    assert "PrometheusRule/jcl-training" not in off and "ConfigMap/jcl-dashboard" not in off


def test_rendezvous_id_is_stable_and_unique_per_run():
    values = load_values()
    first = rendezvous_id(values, "pretrain")
    assert first == rendezvous_id(load_values(), "pretrain")
    other = load_values(sets=["pretrain.training.output_url=s3://runs/other"])
    assert rendezvous_id(other, "pretrain") != first
    assert rendezvous_id(load_values(sets=["rendezvous.id=mine"]), "pretrain") == "mine"


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["pod.terminationGracePeriodSeconds=60"], "must be at least restart.shutdownTimeout"),
        (["pod.nprocPerNode=2"], "must equal pod.gpus"),
        (["pretrain.nodes.min=3"], "1 <= min <= replicas <= max"),
        (["pretrain.name=Bad_Name"], "DNS-1035"),
        (["restart.policy=Always"], "Always reruns a worker that finished"),
        (["restart.cleanPodPolicy=Some"], "cleanPodPolicy must be None, Running or All"),
        (["metrics.port=23456"], "overlap rendezvous.port"),
        (["pretrain.preset=tiny"], "preset must be imagenet or small"),
        (["pretrain.training.k_crops=1"], "pretrain.training: k_crops must be at least 2"),
        (["lincls.name=jcl-pretrain"], "must differ"),
        (["metrics.alerts.dataWaitShare=1.5"], "dataWaitShare must be between 0 and 1"),
        (["metrics.alerts.noProgressMinutes=0"], "noProgressMinutes must be at least 1"),
        (["metrics.dashboard.sidecarLabel="], "sidecarLabel must not be empty"),
    ],
)
def test_inconsistent_values_fail(sets, message):
    with pytest.raises(ValuesError, match=message.replace("(", r"\(")):
        render(load_values(sets=sets))
