"""run-local's plan: the environment, files and command each worker gets; the restart rules."""

import io
import sys
from pathlib import Path

import pytest
import yaml

from jcl_k8s.k8s.run_local import (
    JobPlan,
    RunLocalError,
    Supervisor,
    _siblings,
    container_status,
    load_documents,
    operator_environment,
    patch,
    plan,
)

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / "manifests" / "pretrain-pytorchjob.yaml"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret",
               "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "PATH": "/usr/bin", "HOME": "/root",
               "UNRELATED": "x"}


def committed(sets=(), set_strings=()):
    documents = load_documents([str(MANIFEST)])
    job = next(d for d in documents if d["kind"] == "PyTorchJob")
    patch(job, sets, set_strings)
    return job, documents + _siblings([str(MANIFEST)])


def tiny(tmp_path, environ=None, **kwargs):
    job, others = committed(["spec.pytorchReplicaSpecs.Worker.replicas=2",
                             "spec.elasticPolicy.minReplicas=2"], ["spec.nprocPerNode=1"])
    return plan(job, others, tmp_path, 29400, CREDENTIALS if environ is None else environ,
                **kwargs)


def test_operator_environment_of_an_elastic_job():
    job, _ = committed()
    env = operator_environment(job["spec"], 2, 4242)
    assert env == {
        "PYTHONUNBUFFERED": "1",
        "PET_NPROC_PER_NODE": "4",
        "PET_NNODES": "1:2",
        "PET_RDZV_ENDPOINT": "127.0.0.1:4242",
        "PET_RDZV_BACKEND": "c10d",
        "PET_MAX_RESTARTS": "20",
        "PET_RDZV_ID": job["spec"]["elasticPolicy"]["rdzvId"],
        "PET_RDZV_CONF": "join_timeout=900,last_call_timeout=60,close_timeout=60,read_timeout=120",
    }


def test_each_worker_gets_the_pods_environment(tmp_path):
    job_plan = tiny(tmp_path)
    assert [w.name for w in job_plan.workers] == ["jcl-pretrain-worker-0", "jcl-pretrain-worker-1"]
    env = job_plan.workers[1].env
    assert env["PET_NNODES"] == "2:2" and env["PET_NPROC_PER_NODE"] == "1"
    assert env["PET_RDZV_ENDPOINT"] == "127.0.0.1:29400"
    assert env["PYTHONUNBUFFERED"] == "1"
    # The container's env, and the Secret's variables from the local environment.
    assert env["JCL_JOB_NAME"] == "jcl-pretrain"
    assert env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "90"
    assert env["AWS_DEFAULT_REGION"] == "us-east-1"
    assert env["AWS_ACCESS_KEY_ID"] == "id" and env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9"
    assert "UNRELATED" not in env  # a pod does not see this machine's environment
    assert str(REPO) in env["PYTHONPATH"].split(":")
    assert (job_plan.restart_policy, job_plan.backoff_limit, job_plan.grace_seconds) == (
        "OnFailure", 10, 120.0
    )


def test_configmap_files_and_rewritten_command(tmp_path):
    worker = tiny(tmp_path, train=["epochs=1"], preset="small", metrics_port=9500).workers[1]
    config = tmp_path / "jcl-pretrain-worker-1" / "mounts" / "etc" / "jcl-k8s" / "pretrain.yaml"
    assert yaml.safe_load(worker.files[config])["output_url"] == "s3://jcl-runs/jcl-pretrain"
    assert worker.argv[:4] == [sys.executable, "-m", "jcl_k8s", "launch"]
    assert worker.argv[4:] == [
        "--dns-timeout", "1800", "--", "pretrain", "--preset", "imagenet", "--config",
        str(config), "--preset", "small", "metrics.port=9501", "epochs=1",
    ]
    assert worker.cwd == tmp_path / "jcl-pretrain-worker-1" / "workdir"


def test_metrics_off_by_default_so_workers_share_no_ports(tmp_path):
    assert all("metrics.port=0" in w.argv for w in tiny(tmp_path).workers)


def test_missing_secret_variables_are_named(tmp_path):
    with pytest.raises(RunLocalError, match="not set: AWS_SECRET_ACCESS_KEY"):
        tiny(tmp_path, environ={"AWS_ACCESS_KEY_ID": "id"})
    worker = tiny(tmp_path, environ={"S3_KEY": "k"}, secrets={"jcl-s3": ["S3_KEY"]}).workers[0]
    assert worker.env["S3_KEY"] == "k" and "AWS_ACCESS_KEY_ID" not in worker.env


def test_missing_configmap_is_an_error(tmp_path):
    job, _ = committed()
    with pytest.raises(RunLocalError, match="mounts ConfigMap 'jcl-pretrain-config'"):
        plan(job, [], tmp_path, 1, CREDENTIALS)


def test_field_refs_and_secret_key_refs(tmp_path):
    job, others = committed()
    container = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    container["env"] += [
        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "AWS_SECRET_ACCESS_KEY",
         "valueFrom": {"secretKeyRef": {"name": "other", "key": "secret"}}},
        {"name": "GREETING", "value": "hi $(POD)"},
    ]
    env = plan(job, others, tmp_path, 1, CREDENTIALS).workers[1].env
    assert (env["POD"], env["IP"], env["GREETING"]) == (
        "jcl-pretrain-worker-1", "127.0.0.1", "hi jcl-pretrain-worker-1"
    )
    container["env"].append(
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "t", "key": "token"}}}
    )
    with pytest.raises(RunLocalError, match="set TOKEN in the local environment"):
        plan(job, others, tmp_path, 1, CREDENTIALS)


def test_only_worker_only_elastic_jobs_run(tmp_path):
    job, others = committed()
    del job["spec"]["elasticPolicy"]
    with pytest.raises(RunLocalError, match="worker-only elastic"):
        plan(job, others, tmp_path, 1, CREDENTIALS)
    job, others = committed(["spec.pytorchReplicaSpecs.Worker.template.spec.containers[0].name=x"])
    with pytest.raises(RunLocalError, match="named 'pytorch'"):
        plan(job, others, tmp_path, 1, CREDENTIALS)


def test_other_volume_kinds_are_refused(tmp_path):
    job, others = committed([
        "spec.pytorchReplicaSpecs.Worker.template.spec.volumes[0].hostPath.path=/data",
    ])
    del job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["volumes"][0][
        "configMap"]
    with pytest.raises(RunLocalError, match="is a hostPath"):
        plan(job, others, tmp_path, 1, CREDENTIALS)


def supervisor(policy, limit):
    return Supervisor(JobPlan("j", [], policy, limit, 1.0), 10, 0, io.StringIO())


@pytest.mark.parametrize(
    ("policy", "limit", "restarts", "code", "fails"),
    [
        ("OnFailure", 10, 0, 1, False),
        ("OnFailure", 10, 0, 137, False),
        ("OnFailure", 2, 2, 1, True),        # backoffLimit reached
        ("OnFailure", None, 100, 1, False),  # no limit
        ("ExitCode", 10, 0, 143, False),     # retryable
        ("ExitCode", 10, 0, 1, True),        # permanent
        ("ExitCode", 10, 0, 2, True),
        ("Never", 10, 0, 143, True),
    ],
)
def test_restart_rules(policy, limit, restarts, code, fails):
    sup = supervisor(policy, limit)
    sup.restarts = restarts
    assert bool(sup.retry(code)) == fails


def test_container_status():
    assert [container_status(c) for c in (0, 1, 143, -9, -15)] == [0, 1, 143, 137, 143]
