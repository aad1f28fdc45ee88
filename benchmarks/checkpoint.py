"""Checkpoint cost of a ResNet-50 JCL state (both encoders, 65536-key queue, SGD
momentum), to a local directory and to a moto S3 server, side by side with a
plain synchronous `torch.save` to local disk.

    python benchmarks/checkpoint.py [--repeats 3]

Prints one table: training stall per save (the in-memory snapshot), background
upload time, restore time (download + checksum + weights_only load) and bytes.
"""

import argparse
import os
import socket
import statistics
import tempfile
import time

import torch

from jcl_k8s import checkpoint
from jcl_k8s.model import JCL


def training_state() -> dict:
    model = JCL("resnet50", "imagenet", dim=128, queue_size=65536)
    optimizer = torch.optim.SGD(model.query_encoder.parameters(), lr=0.03, momentum=0.9)
    for p in model.query_encoder.parameters():  # give SGD its momentum buffers
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return {"epoch": 1, "state_dict": model.state_dict(), "optimizer": optimizer.state_dict()}


def moto_endpoint():
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    import boto3

    boto3.client("s3").create_bucket(Bucket="bench")
    return server


def measure_store(run_url: str, state: dict, repeats: int) -> dict:
    stalls, uploads, restores = [], [], []
    timings = []
    writer = checkpoint.BackgroundWriter(run_url, keep_last=2,
                                         on_saved=lambda s, n: timings.append((s, n)))
    for step in range(1, repeats + 1):
        stalls.append(writer.save(step, state))
        writer.wait()
        uploads.append(timings[-1][0])
        started = time.perf_counter()
        checkpoint.load(run_url)
        restores.append(time.perf_counter() - started)
    return {"stall": statistics.median(stalls), "upload": statistics.median(uploads),
            "restore": statistics.median(restores), "bytes": timings[-1][1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    state = training_state()
    server = moto_endpoint()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        plain = []
        for i in range(args.repeats):
            started = time.perf_counter()
            torch.save(state, f"{tmp}/plain-{i}.pt")
            os.sync()
            plain.append(time.perf_counter() - started)
        size = os.path.getsize(f"{tmp}/plain-0.pt")
        baseline = statistics.median(plain)
        rows.append(("torch.save, local disk (sync)", baseline, baseline, float("nan"), size))
        stores = (("jcl-k8s, local disk", f"{tmp}/run"), ("jcl-k8s, moto S3", "s3://bench/run"))
        for name, url in stores:
            result = measure_store(url, state, args.repeats)
            rows.append((name, result["stall"], result["upload"], result["restore"],
                         result["bytes"]))
    server.stop()

    print(f"ResNet-50 JCL state, median of {args.repeats} saves")
    print("| store | training stall (s) | upload (s) | restore (s) | MB | stall / torch.save |")
    print("|---|---|---|---|---|---|")
    for name, stall, upload, restore, size in rows:
        print(f"| {name} | {stall:.3f} | {upload:.2f} | {restore:.2f} | {size / 2**20:.0f} "
              f"| {stall / baseline:.2f} |")


if __name__ == "__main__":
    main()
