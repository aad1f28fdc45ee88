"""Preemption and resume for real: torchrun workers on a moto S3 server are
SIGTERM'd or SIGKILL'd mid-epoch and restarted."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from jcl_k8s import checkpoint, storage

pytestmark = pytest.mark.integration

# 200 images, global batch 32: 6 steps an epoch, 12 in all.
TINY = ["--preset", "small", "epochs=2", "batch_size=32", "queue_size=64", "log_every=1",
        "data.num_workers=1", "metrics.port=0", "data.trace_ids=true"]


def launch(nproc: int, *args: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "jcl_k8s", "pretrain", *TINY, *args]
    return subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def run_to_end(nproc: int, *args: str) -> str:
    process = launch(nproc, *args)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    return err


def descendants(root: int) -> list[int]:
    """Every process below `root` (torchrun starts its workers in sessions of their own)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    found, frontier = [], [root]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        found.extend(children)
        frontier = children
    return found


def interrupt_when(process: subprocess.Popen, marker: str, sig: int, timeout=240) -> str:
    """Read the log until `marker` appears, then signal: SIGTERM goes to torchrun (as
    the kubelet sends it to the container's PID 1), SIGKILL to every process (a node
    that vanishes)."""
    lines = []
    deadline = time.monotonic() + timeout
    for line in process.stderr:
        lines.append(line)
        if marker in line:
            if sig == signal.SIGKILL:
                for pid in [process.pid, *descendants(process.pid)]:
                    os.kill(pid, sig)
            else:
                process.send_signal(sig)
            break
        assert time.monotonic() < deadline, "".join(lines[-30:])
    else:
        raise AssertionError(f"{marker!r} never appeared:\n{''.join(lines[-30:])}")
    rest = process.communicate(timeout=120)[1]
    return "".join(lines) + rest


@pytest.fixture(scope="module")
def data(s3_server):
    import boto3

    boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"]).create_bucket(Bucket="resume")
    done = subprocess.run([sys.executable, "-m", "jcl_k8s", "prepare-data", "fashion-mnist",
                           "s3://resume/data", "--per-class", "20", "--val-per-class", "5"],
                          capture_output=True, text=True, timeout=120)
    if done.returncode and "not found" in done.stderr:
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    assert done.returncode == 0, done.stderr
    return "s3://resume/data"


@pytest.fixture(scope="module")
def uninterrupted(data):
    run = "s3://resume/runs/uninterrupted"
    run_to_end(2, f"data.url={data}", f"output_url={run}")
    return checkpoint.load(run)[1]


def final_weights(run: str) -> dict[str, torch.Tensor]:
    url, state = checkpoint.load(run)
    assert url.endswith("step-000000012")
    return state["state_dict"]


def traced_ids(run: str) -> list[tuple[int, int, list[int]]]:
    fs, path = storage.url_to_fs(storage.join(run, "traces"))
    fs.invalidate_cache()
    steps = []
    for file in sorted(fs.ls(path, detail=False)):
        steps.extend((epoch, step, ids) for epoch, step, *ids in json.loads(fs.cat_file(file)))
    return steps


def test_sigterm_mid_epoch_then_restart_is_bit_identical(data, uninterrupted):
    run = "s3://resume/runs/sigterm"
    first = launch(2, f"data.url={data}", f"output_url={run}")
    log = interrupt_when(first, "epoch 1/2 step 2/6 ", signal.SIGTERM)
    assert first.returncode != 0
    assert "SIGTERM received: saving a checkpoint at the next step boundary" in log
    saved = checkpoint.committed(run)
    assert len(saved) == 1
    stopped_at = int(saved[0].rsplit("-", 1)[1])
    assert 2 <= stopped_at < 6, "the preemption checkpoint must be mid-epoch"
    assert f"stopped at global step {stopped_at} after a preemption checkpoint; exit 143" in log

    log = run_to_end(2, f"data.url={data}", f"output_url={run}")
    assert f"resumed from {saved[0]} at epoch 1, step {stopped_at} of the epoch" in log

    resumed, reference = final_weights(run), uninterrupted["state_dict"]
    assert resumed.keys() == reference.keys()
    different = [k for k in reference if not torch.equal(resumed[k], reference[k])]
    assert different == [], f"{len(different)} tensors differ, first {different[:3]}"
    records = [json.loads(x) for x in storage.read_text(f"{run}/metrics.jsonl").splitlines()]
    assert [r["global_step"] for r in records] == list(range(1, 13))


def test_sigkill_during_an_upload_resumes_from_the_previous_commit(data):
    run = "s3://resume/runs/sigkill"
    first = launch(2, f"data.url={data}", f"output_url={run}", "checkpoint.every_steps=2",
                   "checkpoint.keep_last=5")
    # Step 4's save first waits for step 2's upload, so step 2 is committed here,
    # and step 4's upload has just begun.
    interrupt_when(first, "checkpoint at global step 4: training stalled", signal.SIGKILL)
    committed = checkpoint.committed(run)
    assert [u.rsplit("/", 1)[1] for u in committed] == ["step-000000002"]
    _, state = checkpoint.load(committed[0])
    assert state["position"] == {"epoch": 0, "step_in_epoch": 2, "global_step": 2}

    log = run_to_end(2, f"data.url={data}", f"output_url={run}", "checkpoint.every_steps=2",
                     "checkpoint.keep_last=5")
    assert f"resumed from {committed[0]} at epoch 1, step 2 of the epoch" in log
    assert final_weights(run)


def test_two_processes_to_one_mid_epoch_sees_every_sample_once(data):
    run = "s3://resume/runs/elastic"
    first = launch(2, f"data.url={data}", f"output_url={run}")
    interrupt_when(first, "epoch 1/2 step 3/6 ", signal.SIGTERM)
    stopped_at = int(checkpoint.committed(run)[0].rsplit("-", 1)[1])
    assert stopped_at < 6

    log = run_to_end(1, f"data.url={data}", f"output_url={run}")
    assert "world size changed from 2 to 1 on resume" in log
    assert "each process now takes 32 images per step" in log

    steps = traced_ids(run)
    # Before the checkpoint two ranks took 16 images a step; after it one takes 32.
    assert {len(ids) for _, step, ids in steps if step <= stopped_at} == {16}
    assert {len(ids) for _, step, ids in steps if step > stopped_at} == {32}
    first_epoch = [i for epoch, _, ids in steps if epoch == 0 for i in ids]
    assert len(first_epoch) == len(set(first_epoch)) == 6 * 32
    second_epoch = [i for epoch, _, ids in steps if epoch == 1 for i in ids]
    assert len(second_epoch) == len(set(second_epoch)) == 6 * 32
    assert final_weights(run)
