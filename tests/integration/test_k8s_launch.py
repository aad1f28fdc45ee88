"""`jcl-k8s launch` (the pods' entrypoint) stopped by SIGTERM during a real torchrun pretrain:
the trainer saves a checkpoint at the next step boundary and launch exits 143 (retryable)."""

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from jcl_k8s import checkpoint

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def test_sigterm_during_pretrain_exits_143_after_a_committed_checkpoint(fashion_mnist_dir,
                                                                       tmp_path):
    run_url = str(tmp_path / "run")
    env = {**os.environ, "PYTHONPATH": str(REPO), "PET_NPROC_PER_NODE": "1",
           "PET_STANDALONE": "1"}  # one node, rendezvous on a free local port
    env.pop("PET_RDZV_ENDPOINT", None)
    command = [
        sys.executable, "-m", "jcl_k8s", "launch", "--", "pretrain", "--preset", "small",
        f"data.url={fashion_mnist_dir}", f"output_url={run_url}", "epochs=2", "batch_size=32",
        "data.num_workers=0", "queue_size=64", "log_every=1", "metrics.port=0",
        "checkpoint.every_minutes=0", "checkpoint.at_epoch_end=false",
    ]
    launch = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(launch.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not any(re.search(r"epoch 1/2 step 1/6", line) for line in lines):
            assert time.monotonic() < deadline and launch.poll() is None, "".join(lines)[-4000:]
            time.sleep(0.1)
        launch.send_signal(signal.SIGTERM)  # the kubelet stopping the pod
        code = launch.wait(timeout=120)
    finally:
        if launch.poll() is None:
            launch.kill()
    reader.join(timeout=10)
    output = "".join(lines)

    assert code == 143, output[-4000:]
    stopped = re.search(r"stopped at global step (\d+) after a preemption checkpoint", output)
    assert stopped, output[-4000:]
    step = int(stopped[1])
    assert 0 < step < 12, "the run finished before the SIGTERM reached it"
    committed = checkpoint.committed(run_url)
    assert committed and committed[-1].endswith(checkpoint.checkpoint_name(step))
    assert "launch exits 143" in output
