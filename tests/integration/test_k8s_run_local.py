"""The committed pretrain manifest, run by `jcl-k8s run-local`: 2 workers, moto S3, CPU.

Also: killing a worker's process mid-run makes run-local restart it (restartPolicy OnFailure),
the job completes, and after a committed checkpoint it resumes from that checkpoint;
`kubectl kustomize manifests/` builds.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from jcl_k8s import checkpoint, storage

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / "manifests" / "pretrain-pytorchjob.yaml"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="module")
def dataset(s3_server):
    """200 + 50 Fashion-MNIST images in ImageNet layout on the moto S3 server."""
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    import boto3

    from jcl_k8s.data.fashion_mnist import prepare_fashion_mnist

    name = f"k8s-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"]).create_bucket(Bucket=name)
    prepare_fashion_mnist(f"s3://{name}/fm", per_class=20, val_per_class=5)
    return f"s3://{name}"


def run_local_command(bucket, run, epochs, extra=()):
    """The committed manifest with overrides for a tiny CPU run of 2 workers."""
    return [
        sys.executable, "-m", "jcl_k8s", "run-local", str(MANIFEST),
        "--set", "spec.pytorchReplicaSpecs.Worker.replicas=2",
        "--set", "spec.elasticPolicy.minReplicas=2",
        "--set-string", "spec.nprocPerNode=1",
        "--preset", "small",
        "--train", f"data.url={bucket}/fm", "--train", f"output_url={bucket}/{run}",
        "--train", f"epochs={epochs}", "--train", "batch_size=32",
        "--train", "data.num_workers=0", "--train", "queue_size=64", "--train", "log_every=1",
        "--restart-delay", "0.5", "--timeout", "240",
        *(arg for setting in extra for arg in ("--train", setting)),
    ]


class Watched:
    """A run-local process whose output lines are collected as they come."""

    def __init__(self, command):
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            command, cwd=REPO, env=dict(os.environ), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern, timeout):
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            for line in self.lines[seen:]:
                match = re.search(pattern, line)
                if match:
                    return match
            seen = len(self.lines)
            if self.process.poll() is not None and seen == len(self.lines):
                break
            time.sleep(0.1)
        raise AssertionError(f"no line matching {pattern!r}:\n" + "\n".join(self.lines[-40:]))

    def finish(self, timeout):
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.send_signal(signal.SIGINT)
            self.process.wait(timeout=30)
            raise
        self.reader.join(timeout=10)
        return code

    @property
    def output(self):
        return "\n".join(self.lines)


def test_committed_manifest_runs_locally_to_a_committed_checkpoint(dataset):
    run = Watched(run_local_command(dataset, "run", epochs=1))
    code = run.finish(timeout=280)
    assert code == 0, run.output[-4000:]
    # Each worker's output carries its pod name; both started with the operator's variables.
    for worker in ("jcl-pretrain-worker-0", "jcl-pretrain-worker-1"):
        assert f"[run-local] {worker} started" in run.output
        assert re.search(rf"^\[{worker}\] .*PET_NNODES=2:2 .*PET_RDZV_ENDPOINT=127\.0\.0\.1:",
                         run.output, re.M)
    assert "[run-local] jcl-pretrain succeeded" in run.output
    committed = checkpoint.committed(f"{dataset}/run")
    assert committed, "no committed checkpoint"
    assert checkpoint.load_latest(f"{dataset}/run") is not None


def test_killed_worker_is_restarted_and_resumes_from_the_committed_checkpoint(dataset):
    """A worker's container dies (node loss, OOM kill) after a committed checkpoint: run-local
    restarts it (OnFailure), and the run continues from that checkpoint to the end."""
    run_url = f"{dataset}/resumed"
    run = Watched(run_local_command(dataset, "resumed", epochs=2, extra=[
        "checkpoint.every_steps=4", "checkpoint.at_epoch_end=false",
    ]))
    pid = int(run.wait_for(r"\[run-local\] jcl-pretrain-worker-1 started \(pid (\d+)\)", 30)[1])
    deadline = time.monotonic() + 180
    while not checkpoint.committed(run_url):
        assert time.monotonic() < deadline and run.process.poll() is None, run.output[-4000:]
        time.sleep(0.2)
    before = checkpoint.committed(run_url)[-1]
    os.kill(pid, signal.SIGKILL)
    code = run.finish(timeout=280)
    assert code == 0, run.output[-4000:]

    assert "[run-local] jcl-pretrain-worker-1 exited with 137" in run.output
    assert "[run-local] restarting jcl-pretrain-worker-1 (restart 1 of the job)" in run.output
    assert len(re.findall(r"\[run-local\] jcl-pretrain-worker-1 started", run.output)) >= 2
    after = run.output[run.output.index("restarting jcl-pretrain-worker-1"):]
    resumed = re.search(r"resumed from (\S+) at epoch (\d+), step (\d+)", after)
    assert resumed, after[-4000:]
    step = int(re.search(r"step-(\d+)$", resumed[1])[1])
    assert step >= int(re.search(r"step-(\d+)$", before)[1]) > 0
    # The sampler's count for an uninterrupted run: 200 images // 32 per step, 2 epochs.
    final = json.loads(storage.read_text(f"{run_url}/final.json"))
    assert final["global_steps"] == 2 * (200 // 32)
    assert final["checkpoint"].endswith(checkpoint.checkpoint_name(2 * (200 // 32)))
    _, state = checkpoint.load_latest(run_url)
    assert state["position"]["global_step"] == 2 * (200 // 32)


def test_kustomize_builds_the_manifests():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    result = subprocess.run([kubectl, "kustomize", str(REPO / "manifests")], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    kinds = re.findall(r"^kind: (\w+)$", result.stdout, re.M)
    assert sorted(kinds) == sorted(["ServiceAccount", "ConfigMap", "ConfigMap", "PyTorchJob",
                                    "PyTorchJob", "PodMonitor", "PodMonitor",
                                    "PrometheusRule", "ConfigMap"])
