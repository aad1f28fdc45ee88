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
import os
import time
from dataclasses import asdict, dataclass, field
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
from jcl_k8s.preemption import EXIT_PREEMPTED, Preempted, StepAgreement
from jcl_k8s.resume import Position, find_resume_point, gather_rng_states, restore

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

    @staticmethod
    def read(run_url: str) -> list[dict[str, Any]]:
        """The records already written for a run (none when it has no log yet)."""
        url = storage.join(run_url, "metrics.jsonl")
        if not storage.exists(url):
            return []
        return [json.loads(line) for line in storage.read_text(url).splitlines() if line]


class IdTrace:
    """Per rank: the sample ids of every step of this attempt, written at each save."""

    def __init__(self, run_url: str, rank: int, enabled: bool):
        self.enabled = enabled
        self.url = storage.join(run_url, "traces", f"attempt-{time.time_ns()}-rank{rank}.json")
        self.steps: list[list[int]] = []

    def add(self, epoch: int, global_step: int, ids: torch.Tensor) -> None:
        if self.enabled:
            self.steps.append([epoch, global_step, *ids.tolist()])

    def flush(self) -> None:
        if self.enabled and self.steps:
            storage.write_text(self.url, json.dumps(self.steps))


def own_process_group(_worker_id: int) -> None:
    """Each DataLoader worker leaves its parent's process group: torchrun sends
    SIGTERM to the whole group of every training process, and the workers must
    keep serving batches until the training process has saved its checkpoint.
    They still stop with their loader, or when the training process dies."""
    os.setpgid(0, 0)


def build_loader(config: DictConfig, env: distributed.DistEnv):
    index = load_split_index(config.data.url, "train", env)
    cache = fetch_all(config.data.url, "train", index) if config.data.cache_bytes else None
    augmentation = moco_v2_augmentation(config.data.image_size, config.data.min_crop_scale)
    transform = MultiCrop(augmentation, config.k_crops)
    dataset = ImageSplit(config.data.url, "train", index, transform, config.seed, cache)
    sampler = GlobalBatchSampler(
        len(dataset), config.batch_size, env.rank, env.world_size, config.seed
    )
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=config.data.num_workers,
        pin_memory=env.device.type == "cuda",
        multiprocessing_context="fork" if config.data.num_workers > 0 else None,
        worker_init_fn=own_process_group,
    )
    return dataset, sampler, loader


def start_run(phase: str, config: DictConfig) -> tuple[distributed.DistEnv, TrainingMetrics]:
    """What every command does first: join the process group, set up logging and the
    seed, and start this process's metrics exporter."""
    env = distributed.setup()
    configure_logging(env)
    torch.manual_seed(config.seed)
    metrics = TrainingMetrics(phase, job_label(config.metrics.job, config.output_url),
                              env.rank, env.local_rank, config.metrics.port)
    metrics.set_world_size(env.world_size)
    return env, metrics


def pretrain(config: DictConfig) -> dict[str, Any]:
    """Train (or continue training); returns the summary also written to RUN/final.json."""
    env, metrics = start_run("pretrain", config)
    agreement = StepAgreement()
    try:
        return _train(config, env, metrics, agreement)
    finally:
        agreement.close()
        metrics.close()
        distributed.teardown()


def _train(config: DictConfig, env: distributed.DistEnv, metrics: TrainingMetrics,
           agreement: StepAgreement) -> dict[str, Any]:
    run_url = config.output_url
    dataset, sampler, loader = build_loader(config, env)
    log.info("train: %d images in %d classes from %s", len(dataset), len(dataset.classes),
             config.data.url)

    model = JCL(
        arch=config.model.arch, stem=config.model.stem, dim=config.model.dim,
        mlp=config.model.mlp, queue_size=config.queue_size, key_momentum=config.key_momentum,
        shuffle_bn_groups=config.shuffle_bn_groups,
    ).to(env.device)
    core = model
    base_lr = config.lr * config.batch_size / 256
    optimizer = torch.optim.SGD(
        core.query_encoder.parameters(), lr=base_lr, momentum=config.momentum,
        weight_decay=config.weight_decay,
    )

    # Resume before DDP wraps the model, so DDP broadcasts the restored weights.
    found = find_resume_point(config.resume, run_url) if env.is_main else None
    found = distributed.broadcast_object(found)
    position = Position()
    metrics_log = MetricsLog(run_url)
    if found is not None:
        url, state = found
        position = restore(state, url, core, optimizer, config.batch_size, len(dataset),
                           env.rank, env.world_size, config.seed)
        metrics_log.records = [r for r in MetricsLog.read(run_url)
                               if r.get("global_step", 0) <= position.global_step]
        metrics.count_resume()
        if position.epoch >= config.epochs and checkpoint.finished(run_url):
            log.info("run %s is already complete (%d epochs); nothing to do", run_url,
                     config.epochs)
            return checkpoint.read_final(run_url)
    if env.is_main:
        storage.write_text(storage.join(run_url, "config.yaml"), to_yaml(config))

    if env.distributed:
        model = DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == "cuda" else None
        )
        log.info("shuffle-BN: keys computed on a batch shuffled across all %d processes",
                 env.world_size)
    else:
        log.info("shuffle-BN: one process, nothing to shuffle across; keys are computed on a "
                 "shuffled batch split into %d BatchNorm groups instead", config.shuffle_bn_groups)
    mode = "JCL" if config.jcl and config.k_crops > 2 else "MoCo v2"
    log.info("%s: %s, k_crops %d, global batch %d (%d per process x %d), lr %.4g, K %d",
             mode, config.model.arch, config.k_crops, config.batch_size, sampler.local_batch,
             env.world_size, base_lr, config.queue_size)

    def saved(seconds: float, size: int) -> None:
        metrics.observe_checkpoint(seconds=seconds, size_bytes=size)
        if seconds > config.checkpoint.grace_seconds:
            log.warning("a checkpoint save took %.1f s, more than checkpoint.grace_seconds=%.0f: "
                        "a preemption save may be cut off; raise the pod's grace period and "
                        "torchrun's shutdown timeout", seconds, config.checkpoint.grace_seconds)

    writer = checkpoint.BackgroundWriter(
        run_url, config.checkpoint.keep_last, config.checkpoint.keep_every_epochs,
        on_saved=saved, on_failed=metrics.observe_checkpoint_failure,
    )
    every_steps = config.checkpoint.every_steps
    every_seconds = 60 * config.checkpoint.every_minutes
    last_save = time.monotonic()
    last_saved_step = position.global_step if found is not None else -1

    def save(pos: Position, epoch_end: bool = False, wait: bool = False) -> None:
        """Snapshot on rank 0 (all ranks take part in gathering RNG states)."""
        nonlocal last_save, last_saved_step
        rng = gather_rng_states(agreement.group)
        trace.flush()
        if env.is_main and pos.global_step != last_saved_step:
            state = {
                "format": checkpoint.FORMAT, "epoch": pos.epoch, "arch": config.model.arch,
                "state_dict": core.state_dict(), "optimizer": optimizer.state_dict(),
                "position": asdict(pos),
                "data": {"global_batch": config.batch_size, "num_samples": len(dataset),
                         "world_size": env.world_size, "seed": config.seed},
                "rng": rng, "config": OmegaConf.to_container(config, resolve=True),
                "versions": versions(),
            }
            metrics_log.flush()
            started = time.perf_counter()
            stalled = writer.save(pos.global_step, state, epoch_end=epoch_end, wait=wait)
            log.info("checkpoint at global step %d: training stalled %.2f s%s", pos.global_step,
                     stalled, f", saved in {time.perf_counter() - started:.1f} s" if wait else "")
        last_save, last_saved_step = time.monotonic(), pos.global_step

    steps_per_epoch = sampler.steps_per_epoch
    total_steps = steps_per_epoch * config.epochs
    trace = IdTrace(run_url, env.rank, config.data.trace_ids)
    skips = SkipCounter()
    global_step = position.global_step
    last_loss = float("nan")
    started = time.perf_counter()
    trained_samples = 0

    for epoch in range(position.epoch, config.epochs):
        model.train()
        metrics.set_epoch(epoch, config.epochs)
        lambda_t = lambda_at(config, epoch)
        first_step = position.step_in_epoch if epoch == position.epoch else 0
        sampler.set_epoch(epoch, first_step)
        window = Window()
        tick = time.perf_counter()
        for step_in_epoch, (crops, _labels, ids, skipped) in enumerate(loader, first_step):
            data_ready = time.perf_counter()
            trace.add(epoch, global_step + 1, ids)
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
                last_loss = _log_window(window, metrics, metrics_log, epoch, step_in_epoch,
                                        steps_per_epoch, global_step, total_steps, lr, config)
                window = Window()

            # Step boundary: all ranks agree on preemption and on timed saves.
            time_due = every_seconds > 0 and time.monotonic() - last_save >= every_seconds
            step_due = every_steps > 0 and global_step % every_steps == 0
            stop, save_now = agreement.agree(env.is_main and (time_due or step_due))
            if save_now:
                last_of_epoch = step_in_epoch + 1 == steps_per_epoch
                here = (Position(epoch + 1, 0, global_step) if last_of_epoch
                        else Position(epoch, step_in_epoch + 1, global_step))
                # At the last step of an epoch the epoch-end save below does it.
                if stop or not (last_of_epoch and config.checkpoint.at_epoch_end):
                    save(here, epoch_end=last_of_epoch, wait=stop)
            if stop:
                metrics.count_preemption()
                log.info("stopped at global step %d after a preemption checkpoint; exit %d",
                         global_step, EXIT_PREEMPTED)
                raise Preempted(global_step)
            tick = time.perf_counter()

        if config.checkpoint.at_epoch_end or epoch == config.epochs - 1:
            save(Position(epoch + 1, 0, global_step), epoch_end=True,
                 wait=epoch == config.epochs - 1)

    elapsed = time.perf_counter() - started
    skipped_total = int(distributed.sum_over_ranks(torch.tensor([skips.count])).item())
    summary = {
        "epochs": config.epochs, "global_steps": global_step,
        "images_per_second": trained_samples / elapsed if trained_samples else 0.0,
        "final_loss": last_loss if math.isfinite(last_loss) else None,
        "skipped_images": skipped_total, "world_size": env.world_size,
    }
    final_url = storage.join(run_url, "checkpoints", checkpoint.checkpoint_name(global_step))
    trace.flush()
    if env.is_main:
        writer.wait()
        metrics_log.flush()
        checkpoint.write_final(run_url, final_url, summary)
        log.info("pretrain done in %.0f s: %s", elapsed, json.dumps(summary))
    distributed.barrier()
    return {**summary, "checkpoint_url": final_url}


def _log_window(window: Window, metrics: TrainingMetrics, metrics_log: MetricsLog, epoch: int,
                step_in_epoch: int, steps_per_epoch: int, global_step: int, total_steps: int,
                lr: float, config: DictConfig) -> float:
    """One log line and metrics record for the steps since the last one; returns the loss."""
    means = distributed.mean_over_ranks(torch.stack(window.losses).mean(0)).tolist()
    throughput = window.samples / window.elapsed
    eta = (total_steps - global_step) * window.elapsed / window.steps
    record = {
        "phase": "pretrain", "time": time.time(), "epoch": epoch, "global_step": global_step,
        "loss": means[0], "ce": means[1], "jcl": means[2], "lr": lr,
        "images_per_second": throughput, "data_wait_share": window.data_wait / window.elapsed,
        "eta_seconds": eta,
    }
    metrics_log.append(record)
    metrics.observe_log(loss=means[0], ce=means[1], jcl=means[2], lr=lr,
                        images_per_second=throughput, eta_seconds=eta, global_step=global_step)
    log.info(
        "epoch %d/%d step %d/%d loss %.4f ce %.4f jcl %.4f lr %.4g img/s %.1f data-wait %.0f%% "
        "eta %s", epoch + 1, config.epochs, step_in_epoch + 1, steps_per_epoch, means[0],
        means[1], means[2], lr, throughput, 100 * record["data_wait_share"], format_eta(eta),
    )
    return means[0]
