"""`jcl-k8s pretrain`: the JCL / MoCo v2 training loop.

The loop owns the schedule (cosine lr per step, the linear lambda ramp per
epoch), timing and logging, the metrics log and the checkpoints at epoch end.
The model (`model.JCL`), the loss (`loss.jcl_loss`) and the data path
(`data/`) are separate modules.

World size: `batch_size` is the global batch and stays fixed whatever the
number of processes, so the lr, the queue and the order of samples do too;
each process takes batch_size / world_size images per step.
"""

import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from jcl_k8s import __version__, checkpoint, distributed, storage
from jcl_k8s.config import to_yaml
from jcl_k8s.data.dataset import ImageSplit, SkipCounter, fetch_all
from jcl_k8s.data.index import load_index
from jcl_k8s.data.sampler import GlobalBatchSampler
from jcl_k8s.data.transforms import MultiCrop, moco_v2_augmentation
from jcl_k8s.metrics import TrainingMetrics, job_label
from jcl_k8s.model import JCL

log = logging.getLogger(__name__)


def configure_logging(env: distributed.DistEnv) -> None:
    """Rank 0 logs at INFO; the other ranks only warn."""
    if not env.is_main:
        logging.getLogger("jcl_k8s").setLevel(logging.WARNING)


def lr_at(config: DictConfig, progress: float, base_lr: float) -> float:
    """Linear warm-up, then cosine decay to 0; `progress` is in epochs."""
    if progress < config.warmup_epochs:
        return base_lr * progress / config.warmup_epochs
    span = max(config.epochs - config.warmup_epochs, 1e-12)
    return base_lr * 0.5 * (1 + math.cos(math.pi * (progress - config.warmup_epochs) / span))


def lambda_at(config: DictConfig, epoch: int) -> float:
    """JCL's linear ramp lambda * (epoch + 1) / epochs; 0 in MoCo v2 mode."""
    return config.jcl_lambda * (epoch + 1) / config.epochs if config.jcl else 0.0


def versions() -> dict[str, str]:
    import torchvision

    return {"jcl_k8s": __version__, "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__)}


def load_split_index(url: str, split: str, env: distributed.DistEnv, classes=None):
    """The split's listing: rank 0 reads or builds (and writes) it, the others receive it."""
    index = load_index(url, split, write=True, classes=classes) if env.is_main else None
    return distributed.broadcast_object(index)


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


@dataclass
class Window:
    """Sums over the steps since the last log line."""

    steps: int = 0
    samples: int = 0
    data_wait: float = 0.0
    elapsed: float = 0.0
    losses: list[torch.Tensor] = field(default_factory=list)

    def add(self, samples: int, data_wait: float, elapsed: float, losses: torch.Tensor) -> None:
        self.steps += 1
        self.samples += samples
        self.data_wait += data_wait
        self.elapsed += elapsed
        self.losses.append(losses)


class MetricsLog:
    """The run's JSON-lines metrics log, kept by rank 0 and rewritten at epoch ends."""

    def __init__(self, run_url: str, records: list[dict[str, Any]] | None = None):
        self.url = storage.join(run_url, "metrics.jsonl")
        self.records = records or []

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def flush(self) -> None:
        storage.write_text(self.url, "".join(json.dumps(r) + "\n" for r in self.records))


def build_loader(config: DictConfig, env: distributed.DistEnv):
    index = load_split_index(config.data.url, "train", env)
    cache = fetch_all(config.data.url, "train", index) if config.data.cache_bytes else None
    transform = MultiCrop(moco_v2_augmentation(config.data.image_size), config.k_crops)
    dataset = ImageSplit(config.data.url, "train", index, transform, config.seed, cache)
    sampler = GlobalBatchSampler(
        len(dataset), config.batch_size, env.rank, env.world_size, config.seed
    )
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=config.data.num_workers,
        pin_memory=env.device.type == "cuda",
        persistent_workers=config.data.num_workers > 0,
        multiprocessing_context="fork" if config.data.num_workers > 0 else None,
    )
    return dataset, sampler, loader


def pretrain(config: DictConfig) -> dict[str, Any]:
    """Train; returns the summary that is also written to RUN/final.json."""
    env = distributed.setup()
    configure_logging(env)
    torch.manual_seed(config.seed)
    run_url = config.output_url
    metrics = TrainingMetrics("pretrain", job_label(config.metrics.job, run_url), env.rank,
                              env.local_rank, config.metrics.port)
    metrics.set_world_size(env.world_size)
    if env.is_main:
        storage.write_text(storage.join(run_url, "config.yaml"), to_yaml(config))

    dataset, sampler, loader = build_loader(config, env)
    log.info("train: %d images in %d classes from %s", len(dataset), len(dataset.classes),
             config.data.url)

    model = JCL(
        arch=config.model.arch, stem=config.model.stem, dim=config.model.dim,
        mlp=config.model.mlp, queue_size=config.queue_size, key_momentum=config.key_momentum,
        shuffle_bn_groups=config.shuffle_bn_groups,
    ).to(env.device)
    core = model
    if env.distributed:
        model = DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == "cuda" else None
        )
        log.info("shuffle-BN: keys computed on a batch shuffled across all %d processes",
                 env.world_size)
    else:
        log.info("shuffle-BN: one process, nothing to shuffle across; keys are computed on a "
                 "shuffled batch split into %d BatchNorm groups instead", config.shuffle_bn_groups)

    base_lr = config.lr * config.batch_size / 256
    optimizer = torch.optim.SGD(
        core.query_encoder.parameters(), lr=base_lr, momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    mode = "JCL" if config.jcl and config.k_crops > 2 else "MoCo v2"
    log.info("%s: %s, k_crops %d, global batch %d (%d per process x %d), lr %.4g, K %d",
             mode, config.model.arch, config.k_crops, config.batch_size, sampler.local_batch,
             env.world_size, base_lr, config.queue_size)

    steps_per_epoch = sampler.steps_per_epoch
    total_steps = steps_per_epoch * config.epochs
    metrics_log = MetricsLog(run_url)
    skips = SkipCounter()
    global_step = 0
    last_loss = float("nan")
    last_checkpoint = ""
    started = time.perf_counter()
    trained_samples = 0

    for epoch in range(config.epochs):
        model.train()
        lambda_t = lambda_at(config, epoch)
        sampler.set_epoch(epoch)
        metrics.set_epoch(epoch, config.epochs)
        window = Window()
        tick = time.perf_counter()
        for step_in_epoch, (crops, _labels, _ids, skipped) in enumerate(loader):
            data_ready = time.perf_counter()
            metrics.count_skipped_images(skips.update(skipped))
            crops = crops.to(env.device, non_blocking=True)
            lr = lr_at(config, epoch + step_in_epoch / steps_per_epoch, base_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr

            shuffle = torch.Generator().manual_seed(config.seed * 7919 + global_step)
            loss, keys = model(crops, config.tau, lambda_t, shuffle)
            optimizer.zero_grad(set_to_none=True)
            loss.total.backward()
            optimizer.step()
            core.momentum_update()
            core.enqueue(keys)
            global_step += 1
            trained_samples += config.batch_size

            done = time.perf_counter()
            metrics.observe_step(samples=sampler.local_batch, step_seconds=done - tick,
                                 data_wait_seconds=data_ready - tick)
            window.add(config.batch_size, data_ready - tick, done - tick,
                       torch.stack([loss.total, loss.ce, loss.jcl]).detach())
            if global_step % config.log_every == 0 or step_in_epoch == steps_per_epoch - 1:
                means = distributed.mean_over_ranks(torch.stack(window.losses).mean(0)).tolist()
                last_loss = means[0]
                throughput = window.samples / window.elapsed
                eta = (total_steps - global_step) * window.elapsed / window.steps
                record = {
                    "phase": "pretrain", "time": time.time(), "epoch": epoch,
                    "global_step": global_step, "loss": means[0], "ce": means[1],
                    "jcl": means[2], "lr": lr, "images_per_second": throughput,
                    "data_wait_share": window.data_wait / window.elapsed, "eta_seconds": eta,
                }
                metrics_log.append(record)
                metrics.observe_log(loss=means[0], ce=means[1], jcl=means[2], lr=lr,
                                    images_per_second=throughput, eta_seconds=eta,
                                    global_step=global_step)
                log.info(
                    "epoch %d/%d step %d/%d loss %.4f ce %.4f jcl %.4f lr %.4g img/s %.1f "
                    "data-wait %.0f%% eta %s", epoch + 1, config.epochs, step_in_epoch + 1,
                    steps_per_epoch, means[0], means[1], means[2], lr, throughput,
                    100 * record["data_wait_share"], format_eta(eta),
                )
                window = Window()
            tick = time.perf_counter()

        if env.is_main:
            state = {
                "format": checkpoint.FORMAT, "epoch": epoch + 1, "global_step": global_step,
                "arch": config.model.arch, "state_dict": core.state_dict(),
                "optimizer": optimizer.state_dict(),
                "config": OmegaConf.to_container(config, resolve=True), "versions": versions(),
            }
            save_started = time.perf_counter()
            data = checkpoint.serialize(state)
            last_checkpoint = checkpoint.commit(run_url, global_step, data, state)
            metrics.observe_checkpoint(seconds=time.perf_counter() - save_started,
                                       size_bytes=len(data))
            metrics_log.flush()
            log.info("epoch %d done: checkpoint %s", epoch + 1, last_checkpoint)
        distributed.barrier()

    elapsed = time.perf_counter() - started
    skipped_total = int(distributed.sum_over_ranks(torch.tensor([skips.count])).item())
    summary = {
        "epochs": config.epochs, "global_steps": global_step,
        "images_per_second": trained_samples / elapsed, "final_loss": last_loss,
        "skipped_images": skipped_total, "world_size": env.world_size,
    }
    if env.is_main:
        checkpoint.write_final(run_url, last_checkpoint, summary)
        log.info("pretrain done in %.0f s: %s", elapsed, json.dumps(summary))
    distributed.teardown()
    metrics.close()
    return {**summary, "checkpoint_url": last_checkpoint}
