"""`jcl-k8s lincls`: linear classification on a frozen backbone.

The backbone (pretrained or random) stays in eval mode and only a new `fc`
(N(0, 0.01) weights, zero bias) is trained. Two recipes:
- the paper's: augmented images through the frozen backbone every epoch;
- `cached_features`: the backbone runs once per image (evaluation transform),
  and the classifier trains on the stored features, optionally standardised.
Top-1 and top-5 on `val/` are reported and written to RUN/results.json.
"""

import json
import logging
import time
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from jcl_k8s import checkpoint, distributed, storage
from jcl_k8s.config import to_yaml
from jcl_k8s.data.dataset import ImageSplit, SkipCounter, fetch_all
from jcl_k8s.data.sampler import GlobalBatchSampler
from jcl_k8s.data.transforms import eval_transform, linear_train_transform
from jcl_k8s.errors import CheckpointError, DataError
from jcl_k8s.model import build_resnet
from jcl_k8s.pretrain import MetricsLog, load_split_index, start_run

log = logging.getLogger(__name__)


def load_backbone(config: DictConfig, num_classes: int) -> nn.Module:
    """The ResNet with the pretrained weights (all but `fc`) and a fresh linear `fc`."""
    net = build_resnet(config.model.arch, config.model.stem, num_classes)
    if config.pretrained:
        url = config.pretrained
        if config.wait_for_pretrained > 0:
            checkpoint.wait_for_final(url, config.wait_for_pretrained)
        url, state = checkpoint.load(url)
        weights = checkpoint.backbone_state_dict(state, url)
        expected = {k for k in net.state_dict() if not k.startswith("fc.")}
        missing, unexpected = sorted(expected - weights.keys()), sorted(weights.keys() - expected)
        if missing or unexpected:
            keys = [f"first missing key {missing[0]!r}" if missing else "",
                    f"first unexpected key {unexpected[0]!r}" if unexpected else ""]
            saved_arch = state.get("arch")
            arch = f" (the checkpoint's arch is {saved_arch})" if saved_arch else ""
            raise CheckpointError(
                f"{url} does not fit model.arch={config.model.arch} "
                f"model.stem={config.model.stem}{arch}: {', '.join(k for k in keys if k)}"
            )
        shapes = [k for k, v in weights.items() if v.shape != net.state_dict()[k].shape]
        if shapes:
            raise CheckpointError(
                f"{url} does not fit model.arch={config.model.arch} model.stem={config.model.stem}:"
                f" {shapes[0]} has shape {tuple(weights[shapes[0]].shape)}, the model "
                f"{tuple(net.state_dict()[shapes[0]].shape)}"
            )
        net.load_state_dict(weights, strict=False)
        log.info("backbone: %s from %s", config.model.arch, url)
    else:
        log.info("backbone: %s with random weights (baseline)", config.model.arch)
    for name, p in net.named_parameters():
        p.requires_grad = name.startswith("fc.")
    nn.init.normal_(net.fc.weight, std=0.01)
    nn.init.zeros_(net.fc.bias)
    return net


def _features(net: nn.Module, loader: DataLoader, device: torch.device, skips: SkipCounter):
    """Penultimate (pooled) features and labels of every batch of `loader`."""
    fc, net.fc = net.fc, nn.Identity()
    feats, labels, ids = [], [], []
    with torch.no_grad():
        for images, y, i, skipped in loader:
            skips.update(skipped)
            feats.append(net(images.to(device, non_blocking=True)).float().cpu())
            labels.append(y)
            ids.append(i)
    net.fc = fc
    return torch.cat(feats), torch.cat(labels), torch.cat(ids)


def _rank_share(n: int, env: distributed.DistEnv) -> list[int]:
    return list(range(env.rank, n, env.world_size))


def _gather_features(feats, labels, ids, env: distributed.DistEnv):
    """Everyone's features, ordered by sample id, on every rank."""
    if env.distributed:
        parts = [None] * env.world_size
        torch.distributed.all_gather_object(parts, (feats, labels, ids))
        feats = torch.cat([p[0] for p in parts])
        labels = torch.cat([p[1] for p in parts])
        ids = torch.cat([p[2] for p in parts])
    order = torch.argsort(ids)
    return feats[order], labels[order]


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """Counts of top-1 and top-5 hits (top-k capped at the number of classes)."""
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    hits = top == labels.unsqueeze(1)
    return int(hits[:, 0].sum()), int(hits.any(dim=1).sum())


def lincls(config: DictConfig) -> dict[str, Any]:
    env, metrics = start_run("lincls", config)
    run_url = config.output_url
    train_index = load_split_index(config.data.url, "train", env)
    val_index = load_split_index(config.data.url, "val", env, classes=train_index.classes)
    if val_index.classes != train_index.classes:
        raise DataError(f"{config.data.url}: val/ and train/ index different class lists")
    num_classes = len(train_index.classes)
    net = load_backbone(config, num_classes).to(env.device)
    net.eval()
    if env.is_main:
        storage.write_text(storage.join(run_url, "config.yaml"), to_yaml(config))

    size = config.data.image_size
    def split(name, index, transform):
        cache = fetch_all(config.data.url, name, index) if config.data.cache_bytes else None
        return ImageSplit(config.data.url, name, index, transform, config.seed, cache)

    val = split("val", val_index, eval_transform(size))
    train = split("train", train_index,
                  eval_transform(size) if config.cached_features else linear_train_transform(size))
    log.info("lincls: %d train / %d val images, %d classes", len(train), len(val), num_classes)
    loader_options = {
        "num_workers": config.data.num_workers,
        "pin_memory": env.device.type == "cuda",
        "multiprocessing_context": "fork" if config.data.num_workers > 0 else None,
    }
    local_batch = max(1, config.batch_size // env.world_size)
    skips = SkipCounter()
    metrics_log = MetricsLog(run_url)
    started = time.perf_counter()

    def shard_loader(dataset):
        share = torch.utils.data.Subset(dataset, _rank_share(len(dataset), env))
        return DataLoader(share, batch_size=local_batch, **loader_options)

    if config.cached_features:
        train_x, train_y = _gather_features(*_features(net, shard_loader(train), env.device, skips),
                                            env)
        val_x, val_y = _gather_features(*_features(net, shard_loader(val), env.device, skips), env)
        result = _train_on_features(config, net.fc, train_x, train_y, val_x, val_y, metrics_log,
                                    metrics)
    else:
        result = _train_end_to_end(config, net, train, val, env, shard_loader, loader_options,
                                   skips, metrics_log, metrics)

    result["seconds"] = time.perf_counter() - started
    result["skipped_images"] = int(
        distributed.sum_over_ranks(torch.tensor([skips.count])).item()
    )
    result["pretrained"] = config.pretrained or None
    if env.is_main:
        metrics_log.flush()
        storage.write_text(storage.join(run_url, "results.json"), json.dumps(result, indent=2))
        log.info("lincls done: top-1 %.2f%% top-5 %.2f%%", result["top1"], result["top5"])
    distributed.teardown()
    metrics.close()
    return result


class EpochCheckpoints:
    """lincls's own resume: the classifier and its optimiser after every epoch,
    committed under the lincls run URL like pretrain checkpoints."""

    def __init__(self, config: DictConfig, is_main: bool, fc: nn.Module,
                 optimizer: torch.optim.Optimizer):
        self.config, self.is_main, self.fc, self.optimizer = config, is_main, fc, optimizer

    def resume(self) -> int:
        """The number of epochs already done (0 for a fresh run)."""
        if self.config.resume == "never":
            return 0
        found = distributed.broadcast_object(
            checkpoint.load_latest(self.config.output_url) if self.is_main else None
        )
        if found is None:
            return 0
        url, state = found
        if state.get("kind") != "lincls" or state.get("pretrained") != self.config.pretrained:
            raise CheckpointError(
                f"{url} is not a lincls checkpoint of pretrained={self.config.pretrained!r}; "
                "use a new output_url or resume=never"
            )
        self.fc.load_state_dict(state["fc"])
        self.optimizer.load_state_dict(state["optimizer"])
        log.info("resumed lincls from %s after epoch %d", url, state["epoch"])
        return int(state["epoch"])

    def save(self, epochs_done: int) -> None:
        if self.is_main:
            state = {"format": checkpoint.FORMAT, "kind": "lincls", "epoch": epochs_done,
                     "pretrained": self.config.pretrained, "fc": self.fc.state_dict(),
                     "optimizer": self.optimizer.state_dict()}
            checkpoint.save(self.config.output_url, epochs_done, state, epoch_end=True)
            checkpoint.prune(self.config.output_url, keep_last=2)


def _lr_at(config: DictConfig, epoch: int, base_lr: float) -> float:
    return base_lr * 0.1 ** sum(epoch >= m for m in config.lr_milestones)


def _train_on_features(config, fc, train_x, train_y, val_x, val_y, metrics_log, metrics):
    """Train the linear layer on stored features; every rank does the same, identically."""
    if config.standardize:
        mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
        train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    fc = fc.cpu()
    base_lr = config.lr * config.batch_size / 256
    optimizer = torch.optim.SGD(fc.parameters(), lr=base_lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    progress = EpochCheckpoints(config, distributed.is_main(), fc, optimizer)
    first_epoch = progress.resume()
    step = first_epoch * -(-len(train_x) // config.batch_size)
    for epoch in range(first_epoch, config.epochs):
        metrics.set_epoch(epoch, config.epochs)
        generator = torch.Generator().manual_seed(config.seed * 1000 + epoch)
        lr = _lr_at(config, epoch, base_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        order = torch.randperm(len(train_x), generator=generator)
        losses = []
        for start in range(0, len(order), config.batch_size):
            batch = order[start : start + config.batch_size]
            t0 = time.perf_counter()
            loss = F.cross_entropy(fc(train_x[batch]), train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            step += 1
            metrics.observe_step(samples=len(batch), step_seconds=time.perf_counter() - t0,
                                 data_wait_seconds=0.0)
        metrics_log.append({"phase": "lincls", "time": time.time(), "epoch": epoch,
                            "global_step": step, "loss": sum(losses) / len(losses), "lr": lr,
                            "images_per_second": 0.0, "data_wait_share": 0.0})
        metrics.observe_log(loss=sum(losses) / len(losses), lr=lr, images_per_second=0.0,
                            eta_seconds=0.0, global_step=step)
        progress.save(epoch + 1)
    with torch.no_grad():
        top1, top5 = accuracy(fc(val_x), val_y)
    result = {"top1": 100 * top1 / len(val_y), "top5": 100 * top5 / len(val_y),
              "val_images": len(val_y), "train_images": len(train_y), "epochs": config.epochs}
    metrics.observe_accuracy(top1=result["top1"], top5=result["top5"])
    metrics_log.append({"phase": "lincls", "time": time.time(), "epoch": config.epochs - 1,
                        "top1": result["top1"], "top5": result["top5"]})
    return result


def _evaluate(net, loader, device, skips) -> tuple[float, float, int]:
    hits = torch.zeros(3, dtype=torch.long)
    with torch.no_grad():
        for images, labels, _ids, skipped in loader:
            skips.update(skipped)
            top1, top5 = accuracy(net(images.to(device, non_blocking=True)), labels.to(device))
            hits += torch.tensor([top1, top5, len(labels)])
    hits = distributed.sum_over_ranks(hits)
    total = int(hits[2])
    return 100 * hits[0].item() / total, 100 * hits[1].item() / total, total


def _train_end_to_end(config, net, train, val, env, shard_loader, loader_options, skips,
                      metrics_log, metrics) -> dict[str, Any]:
    """The paper's recipe: augmented images through the frozen (eval-mode) backbone."""
    sampler = GlobalBatchSampler(len(train), config.batch_size, env.rank, env.world_size,
                                 config.seed)
    loader = DataLoader(train, batch_sampler=sampler, **loader_options)
    model = net
    if env.distributed:
        model = DistributedDataParallel(
            net, device_ids=[env.device.index] if env.device.type == "cuda" else None
        )
    base_lr = config.lr * config.batch_size / 256
    optimizer = torch.optim.SGD(net.fc.parameters(), lr=base_lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    progress = EpochCheckpoints(config, env.is_main, net.fc, optimizer)
    first_epoch = progress.resume()
    step = first_epoch * sampler.steps_per_epoch
    for epoch in range(first_epoch, config.epochs):
        lr = _lr_at(config, epoch, base_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        sampler.set_epoch(epoch)
        net.eval()
        epoch_start = tick = time.perf_counter()
        wait, seen, losses = 0.0, 0, []
        for images, labels, _ids, skipped in loader:
            wait_end = time.perf_counter()
            skips.update(skipped)
            loss = F.cross_entropy(model(images.to(env.device, non_blocking=True)),
                                   labels.to(env.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
            step += 1
            seen += config.batch_size
            wait += wait_end - tick
            metrics.observe_step(samples=len(labels), step_seconds=time.perf_counter() - tick,
                                 data_wait_seconds=wait_end - tick)
            if step % config.log_every == 0:
                log.info("lincls epoch %d/%d step %d loss %.4f lr %.4g", epoch + 1,
                         config.epochs, step, losses[-1].item(), lr)
            tick = time.perf_counter()
        elapsed = time.perf_counter() - epoch_start
        mean_loss = distributed.mean_over_ranks(torch.stack(losses).mean().reshape(1)).item()
        metrics.observe_log(loss=mean_loss, lr=lr, images_per_second=seen / elapsed,
                            eta_seconds=elapsed * (config.epochs - epoch - 1), global_step=step)
        metrics_log.append({"phase": "lincls", "time": time.time(), "epoch": epoch,
                            "global_step": step, "loss": mean_loss, "lr": lr,
                            "images_per_second": seen / elapsed,
                            "data_wait_share": min(1.0, wait / elapsed)})
        progress.save(epoch + 1)
    top1, top5, n = _evaluate(model, shard_loader(val), env.device, skips)
    metrics.observe_accuracy(top1=top1, top5=top5)
    metrics_log.append({"phase": "lincls", "time": time.time(), "epoch": config.epochs - 1,
                        "top1": top1, "top5": top5})
    return {"top1": top1, "top5": top5, "val_images": n, "train_images": len(train),
            "epochs": config.epochs}
