"""The container entrypoint (launch) and the image that runs it."""

import json
import signal
import socket
from pathlib import Path

import pytest
import yaml

from jcl_k8s.config import ConfigError
from jcl_k8s.k8s.entrypoint import (
    ENTRYPOINT,
    EXIT_PREEMPTED,
    LaunchError,
    check_trainer_args,
    exit_status,
    rendezvous_host,
    torchrun_command,
    wait_for_dns,
)
from jcl_k8s.k8s.render import USER_ID, render_values

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("status", "signalled", "expected"),
    [
        (0, False, 0),                  # training complete
        (0, True, 0),                   # completed just as SIGTERM came
        (1, True, EXIT_PREEMPTED),      # torchrun's exit 1 after SIGTERM: retryable
        (1, False, 1),                  # a trainer failed for good
        (2, False, 2),
        (-signal.SIGKILL, False, 137),  # torchrun killed (OOM): 128 + 9
        (-signal.SIGKILL, True, EXIT_PREEMPTED),
    ],
)
def test_exit_mapping(status, signalled, expected):
    assert exit_status(status, signalled) == expected


def test_rendezvous_host():
    assert rendezvous_host("jcl-pretrain-worker-0:23456") == "jcl-pretrain-worker-0"
    assert rendezvous_host("[fd00::1]:23456") == "fd00::1"
    assert rendezvous_host("etcd-server") == "etcd-server"


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


def test_wait_for_dns_retries_until_the_name_resolves():
    clock, attempts = FakeClock(), []

    def resolve(host, port):
        attempts.append(host)
        if len(attempts) < 4:
            raise socket.gaierror("not yet")

    assert wait_for_dns("w0", 60, resolve=resolve, clock=clock, sleep=clock.sleep)
    assert len(attempts) == 4 and clock.now == 6.0


def test_wait_for_dns_is_bounded():
    clock = FakeClock()

    def never(host, port):
        raise socket.gaierror("no such host")

    assert not wait_for_dns("w0", 30, resolve=never, clock=clock, sleep=clock.sleep)
    assert 30 <= clock.now <= 32


def test_wait_for_dns_stops_on_request():
    clock = FakeClock()
    calls = []

    def never(host, port):
        calls.append(1)
        raise socket.gaierror("no")

    assert not wait_for_dns("w0", 60, resolve=never, clock=clock, sleep=clock.sleep,
                            stopped=lambda: len(calls) >= 2)
    assert len(calls) == 2


def manifest_args(tmp_path, job="pretrain"):
    """The container args of the committed manifest, with its ConfigMap file made local."""
    objects = dict(render_values(job=job))
    container = objects[f"{job}-pytorchjob.yaml"]["spec"]["pytorchReplicaSpecs"]["Worker"][
        "template"]["spec"]["containers"][0]
    config = tmp_path / f"{job}.yaml"
    config.write_text(objects[f"{job}-configmap.yaml"]["data"][f"{job}.yaml"])
    args = container["args"][container["args"].index("--") + 1:]
    return [str(config) if a.endswith(f"/{job}.yaml") else a for a in args]


@pytest.mark.parametrize("job", ["pretrain", "lincls"])
def test_launch_accepts_the_manifests_arguments(tmp_path, job):
    check_trainer_args(manifest_args(tmp_path, job))


def test_launch_rejects_bad_input_before_torchrun(tmp_path):
    with pytest.raises(LaunchError, match="launch runs pretrain or lincls"):
        check_trainer_args(["demo"])
    with pytest.raises(ConfigError, match="unknown setting"):
        check_trainer_args([*manifest_args(tmp_path), "no_such_key=1"])


def test_torchrun_command_reads_pet_variables_itself():
    command = torchrun_command(["pretrain", "--config", "x.yaml"])
    assert command[1:] == ["-m", "torch.distributed.run", "-m", "jcl_k8s", "pretrain",
                           "--config", "x.yaml"]
    assert not any(arg.startswith("--nnodes") or arg.startswith("--rdzv") for arg in command)


# ---------------------------------------------------------------------------- the image


@pytest.fixture(scope="module")
def dockerfile():
    parse = pytest.importorskip("dockerfile_parse")
    return parse.DockerfileParser(path=str(REPO / "docker" / "Dockerfile"))


def instructions(dockerfile, name):
    return [i["value"] for i in dockerfile.structure if i["instruction"] == name]


def test_base_image_is_a_pinned_cuda_pytorch(dockerfile):
    base = dockerfile.baseimage
    repository, _, tag = base.partition("@")[0].rpartition(":")
    assert repository == "pytorch/pytorch"
    assert tag and tag != "latest" and tag[0].isdigit(), base
    assert "cuda" in tag


def test_runs_as_the_non_root_user_the_manifests_expect(dockerfile):
    users = instructions(dockerfile, "USER")
    assert users, "no USER instruction: the image would run as root"
    user = users[-1].split(":")[0]
    assert user.isdigit() and int(user) != 0
    assert int(user) == USER_ID


def test_entrypoint_is_the_manifests_command(dockerfile):
    entrypoint = json.loads(instructions(dockerfile, "ENTRYPOINT")[-1])
    assert entrypoint == list(ENTRYPOINT)
    for _, obj in render_values():
        if obj["kind"] == "PyTorchJob":
            pod = obj["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
            assert pod["containers"][0]["command"] == entrypoint
            assert pod["securityContext"]["runAsUser"] == USER_ID
    for name in ("pretrain", "lincls"):
        manifest = yaml.safe_load((REPO / "manifests" / f"{name}-pytorchjob.yaml").read_text())
        pod = manifest["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
        assert pod["containers"][0]["command"] == entrypoint


def test_installs_the_package_from_the_repo_and_copies_no_secrets(dockerfile):
    copies = instructions(dockerfile, "COPY") + instructions(dockerfile, "ADD")
    sources = [part for value in copies for part in value.split()[:-1]]
    assert "jcl_k8s" in sources and "pyproject.toml" in sources
    assert not any(s in (".", "./", "*") or s.startswith(("~", "/", ".aws", ".kube", ".env"))
                   for s in sources), sources
    assert not instructions(dockerfile, "ADD")
    assert any("pip install ." in run for run in instructions(dockerfile, "RUN"))
    secretish = ("KEY", "SECRET", "TOKEN", "PASSWORD", "CREDENTIAL")
    for name in ("ENV", "ARG"):
        for value in instructions(dockerfile, name):
            assert not any(word in value.upper() for word in secretish), value


def test_oci_labels(dockerfile):
    labels = dockerfile.labels
    for key in ("title", "description", "version", "licenses", "source"):
        assert labels.get(f"org.opencontainers.image.{key}"), key


def test_dockerignore_allows_only_what_the_image_needs():
    lines = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "*"  # ignore everything, then allow the package
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "jcl_k8s"}
