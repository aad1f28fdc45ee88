"""`jcl-k8s demo`: the whole product on one machine, on real images via S3.

Unless AWS_ENDPOINT_URL is set, an S3 endpoint (moto's server) is started on
127.0.0.1. A Fashion-MNIST subset is written there in ImageNet layout, JCL
pretrains under `torchrun` with 2 processes reading from that endpoint, and
linear classifiers are trained on the final checkpoint (read back from S3) and
on a random backbone. The results table is printed and written to
OUTPUT/summary.json.
"""

import json
import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from jcl_k8s import storage
from jcl_k8s.errors import UserError

log = logging.getLogger(__name__)

# Sized for a 2-core laptop CPU (about 8 minutes in all) and chosen by measurement
# (README, "The demo"): with few labelled images a random backbone's features overfit
# the linear probe, which pretrained features do less.
FULL = {"per_class": 150, "val_per_class": 100, "epochs": 40}
QUICK = {"per_class": 100, "val_per_class": 20, "epochs": 2}
PROCESSES = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def s3_endpoint():
    """The S3 endpoint to use: the configured one, or a local moto server."""
    if os.environ.get("AWS_ENDPOINT_URL"):
        log.info("using the S3 endpoint %s from AWS_ENDPOINT_URL", os.environ["AWS_ENDPOINT_URL"])
        yield os.environ["AWS_ENDPOINT_URL"]
        return
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        raise UserError(
            "the demo needs moto's S3 server when AWS_ENDPOINT_URL is unset: "
            "pip install 'jcl-k8s[demo]'"
        ) from None
    port = _free_port()
    _quiet_moto_logs()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for key, value in {
        "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "demo",
        "AWS_SECRET_ACCESS_KEY": "demo", "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        os.environ[key] = value
    log.info("started a local S3 endpoint (moto) at %s", endpoint)
    try:
        yield endpoint
    finally:
        server.stop()


def _create_bucket(bucket: str) -> None:
    fs, _ = storage.url_to_fs(f"s3://{bucket}")
    with storage.explained(f"s3://{bucket}", "creating bucket"):
        fs.mkdir(bucket)


def _quiet_moto_logs() -> None:
    """moto's server logs every request at INFO through werkzeug."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)


def _run(command: list[str], what: str) -> None:
    log.info("running %s: %s", what, " ".join(command))
    completed = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if completed.returncode:
        raise UserError(f"the demo's {what} step failed with exit code {completed.returncode}")


def _torchrun(args: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={PROCESSES}", "-m", "jcl_k8s", *args,
    ]


def run_demo(output_dir: str = "runs/demo", quick: bool = False,
             epochs: int | None = None) -> dict[str, Any]:
    sizes = dict(QUICK if quick else FULL)
    if epochs is not None:
        sizes["epochs"] = epochs
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    with s3_endpoint():
        bucket = f"jcl-demo-{uuid.uuid4().hex[:8]}"
        _create_bucket(bucket)
        data_url = f"s3://{bucket}/fashion-mnist"
        pretrain_url = f"s3://{bucket}/runs/pretrain"

        from jcl_k8s.data.fashion_mnist import prepare_fashion_mnist

        counts = prepare_fashion_mnist(
            data_url, per_class=sizes["per_class"], val_per_class=sizes["val_per_class"]
        )
        log.info("wrote %s to %s", counts, data_url)

        common = [f"data.url={data_url}", "metrics.port=0"]
        _run(_torchrun(["pretrain", "--preset", "small", *common, f"output_url={pretrain_url}",
                        f"epochs={sizes['epochs']}", "checkpoint.every_minutes=2",
                        "checkpoint.at_epoch_end=false"]), "pretrain")
        final = json.loads(storage.read_text(storage.join(pretrain_url, "final.json")))
        # The local S3 endpoint keeps objects in memory only; keep the backbone on disk.
        from jcl_k8s.checkpoint import export_backbone

        backbone_file = output / "backbone.pth"
        export_backbone(final["checkpoint"], str(backbone_file.resolve()))

        probes = {}
        for name, pretrained in (("lincls", pretrain_url), ("random_backbone", "")):
            run_url = f"s3://{bucket}/runs/{name}"
            _run([sys.executable, "-m", "jcl_k8s", "lincls", "--preset", "small", *common,
                  f"output_url={run_url}", f"pretrained={pretrained or repr('')}"], name)
            probes[name] = json.loads(storage.read_text(storage.join(run_url, "results.json")))

    summary = {
        "data": {"url": data_url, **counts},
        "pretrain": {
            "epochs": final["epochs"], "images_per_second": final["images_per_second"],
            "final_loss": final["final_loss"], "processes": final["world_size"],
        },
        "lincls": {"top1": probes["lincls"]["top1"], "top5": probes["lincls"]["top5"]},
        "random_backbone": {
            "top1": probes["random_backbone"]["top1"], "top5": probes["random_backbone"]["top5"],
        },
        "checkpoint_url": final["checkpoint"],
        "backbone_file": str(backbone_file),
        "seconds": time.perf_counter() - started,
    }
    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(results_table(summary))
    print(f"summary written to {output / 'summary.json'}")
    return summary


def results_table(summary: dict[str, Any]) -> str:
    p, lin, rnd = summary["pretrain"], summary["lincls"], summary["random_backbone"]
    rows = [
        ("pretrain", f"{p['epochs']} epochs, {p['processes']} processes, "
                     f"{p['images_per_second']:.0f} img/s, final loss {p['final_loss']:.3f}"),
        ("lincls (JCL backbone)", f"top-1 {lin['top1']:.2f}%  top-5 {lin['top5']:.2f}%"),
        ("lincls (random backbone)", f"top-1 {rnd['top1']:.2f}%  top-5 {rnd['top5']:.2f}%"),
        ("gain over random", f"{lin['top1'] - rnd['top1']:+.2f} top-1 points"),
        ("checkpoint", summary["checkpoint_url"]),
        ("backbone (torchvision)", summary["backbone_file"]),
        ("wall time", f"{summary['seconds']:.0f} s"),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    rule = "-" * max(len(line) for line in lines)
    return "\n".join([rule, *lines, rule])
