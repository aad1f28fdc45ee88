"""End to end on a real S3 API: prepare-data to moto, a 2-process torchrun pretrain
reading from it, then lincls reading the checkpoint back from S3."""

import json
import os
import subprocess
import sys

import pytest

from jcl_k8s import checkpoint, storage

pytestmark = pytest.mark.integration

TINY = ["--preset", "small", "epochs=2", "batch_size=32", "queue_size=64", "log_every=2",
        "data.num_workers=1", "metrics.port=0"]


def jcl(*args, timeout=300, env=None):
    return subprocess.run([sys.executable, "-m", "jcl_k8s", *args], capture_output=True,
                          text=True, timeout=timeout, env=env or os.environ.copy())


def torchrun(*args, nproc=2, timeout=300):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "jcl_k8s", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def s3_dataset(s3_server, tmp_path_factory):
    import boto3

    boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"]).create_bucket(Bucket="fmnist")
    done = jcl("prepare-data", "fashion-mnist", "s3://fmnist/data", "--per-class", "20",
               "--val-per-class", "5")
    if done.returncode and "not found" in done.stderr:
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    assert done.returncode == 0, done.stderr
    assert "train: 200 images" in done.stdout and "val: 50 images" in done.stdout
    return "s3://fmnist/data"


def test_torchrun_pretrain_from_s3_then_lincls_from_its_s3_checkpoint(s3_dataset):
    run = "s3://fmnist/runs/pretrain"
    done = torchrun("pretrain", *TINY, f"data.url={s3_dataset}", f"output_url={run}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "shuffled across all 2 processes" in done.stderr
    assert "epoch 2/2 step 6/6 loss" in done.stderr

    final = json.loads(storage.read_text(f"{run}/final.json"))
    assert final["world_size"] == 2 and final["epochs"] == 2 and final["global_steps"] == 12
    assert final["checkpoint"] == f"{run}/checkpoints/step-000000012"
    assert [u.rsplit("/", 1)[1] for u in checkpoint.committed(run)] == [
        "step-000000006", "step-000000012"]
    records = [json.loads(line) for line in storage.read_text(f"{run}/metrics.jsonl").split("\n")
               if line]
    assert records[-1]["global_step"] == 12 and records[-1]["phase"] == "pretrain"
    assert {"loss", "ce", "jcl", "lr", "images_per_second", "data_wait_share"} <= records[-1].keys()

    _, state = checkpoint.load(run)
    assert state["epoch"] == 2 and state["config"]["data"]["url"] == s3_dataset
    assert {"query_encoder.conv1.weight", "key_encoder.conv1.weight", "queue", "queue_ptr"} <= (
        state["state_dict"].keys())
    assert int(state["state_dict"]["queue_ptr"]) == 12 * 32 % 64

    probe = jcl("lincls", "--preset", "small", f"data.url={s3_dataset}", "epochs=5",
                "batch_size=64", "metrics.port=0", f"pretrained={run}",
                "output_url=s3://fmnist/runs/lincls")
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert ("backbone: resnet18 from s3://fmnist/runs/pretrain/checkpoints/step-000000012"
            in probe.stderr)
    result = json.loads(storage.read_text("s3://fmnist/runs/lincls/results.json"))
    assert result["val_images"] == 50 and result["train_images"] == 200
    assert 10 < result["top1"] <= 100 and result["top5"] >= result["top1"]

    # Starting a finished run again (a pod restarted after the end) changes nothing.
    again = jcl("pretrain", *TINY, f"data.url={s3_dataset}", f"output_url={run}")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "is already complete (2 epochs); nothing to do" in again.stderr
    assert json.loads(storage.read_text(f"{run}/final.json")) == final


def test_lincls_end_to_end_recipe_on_a_random_backbone_under_torchrun(s3_dataset):
    done = torchrun("lincls", "--preset", "small", f"data.url={s3_dataset}", "epochs=1",
                    "batch_size=32", "cached_features=false", "metrics.port=0", "pretrained=''",
                    "output_url=s3://fmnist/runs/lincls-random")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "random weights (baseline)" in done.stderr
    result = json.loads(storage.read_text("s3://fmnist/runs/lincls-random/results.json"))
    assert result["val_images"] == 50


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.url=s3://fmnist/no-such-prefix",
         "data.url s3://fmnist/no-such-prefix does not exist"),
        ("data.url=s3://no-such-bucket/data", "does not exist"),
        ("k_crops=1", "k_crops must be at least 2"),
        ("epochs=ten", "setting epochs"),
        ("tua=0.1", "unknown setting tua"),
        ("output_url=s3://no-such-output-bucket/run", "the bucket does not exist"),
    ],
)
def test_bad_input_stops_before_training_with_one_line(s3_dataset, override, message):
    done = jcl("pretrain", *TINY, f"data.url={s3_dataset}", "output_url=s3://fmnist/runs/bad",
               override)
    if "no-such-output-bucket" in override:
        import boto3

        buckets = [b["Name"] for b in boto3.client("s3").list_buckets()["Buckets"]]
        assert "no-such-output-bucket" not in buckets, "a typo must not create a bucket"
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("jcl-k8s pretrain: error:") and message in last, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not storage.exists("s3://fmnist/runs/bad/checkpoints")


def test_unreachable_endpoint_is_one_line(s3_dataset, tmp_path):
    from tests.conftest import free_port

    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
           "AWS_MAX_ATTEMPTS": "1"}
    done = jcl("pretrain", *TINY, "data.url=s3://fmnist/data", f"output_url={tmp_path}", env=env)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert "s3://fmnist/data" in last and "cannot reach the endpoint" in last


def test_rejected_credentials_are_named(s3_dataset, tmp_path):
    """A second moto server with authentication on: unknown keys get 403."""
    from tests.conftest import free_port

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
               "AWS_ACCESS_KEY_ID": "AKIAUNKNOWN", "AWS_SECRET_ACCESS_KEY": "wrong"}
        done = None
        for _ in range(20):
            done = jcl("pretrain", *TINY, "data.url=s3://fmnist/data", f"output_url={tmp_path}",
                       env=env)
            if "cannot reach the endpoint" not in done.stderr:
                break
        assert done.returncode == 2
        last = done.stderr.strip().splitlines()[-1]
        assert "s3://fmnist/data" in last and "access denied" in last
        assert "AWS_ACCESS_KEY_ID" in last
    finally:
        server.terminate()
        server.wait(10)


def test_lincls_resumes_after_its_last_committed_epoch(s3_dataset):
    run = "s3://fmnist/runs/lincls-resume"
    common = ["lincls", "--preset", "small", f"data.url={s3_dataset}", "batch_size=64",
              "metrics.port=0", "pretrained=''", f"output_url={run}"]
    assert jcl(*common, "epochs=2").returncode == 0
    assert [u.rsplit("/", 1)[1] for u in checkpoint.committed(run)] == [
        "step-000000001", "step-000000002"]
    done = jcl(*common, "epochs=4")
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resumed lincls from {run}/checkpoints/step-000000002 after epoch 2" in done.stderr
    assert json.loads(storage.read_text(f"{run}/results.json"))["epochs"] == 4
