"""Prometheus metrics of one training process, and the exporter that serves them.

`TrainingMetrics` owns a private `CollectorRegistry` (so a process, or a test,
can hold several) and serves it on `/metrics` at `base_port + local_rank` from
prometheus-client's background HTTP thread. Every series carries the labels
`job`, `rank` and `phase` ('pretrain' or 'lincls'); the loss adds `term`, the
accuracy `topk`. Names follow Prometheus conventions: a `jcl_` prefix, base
units (`_seconds`, `_bytes`, `_ratio`), `_total` on counters.

Design rules:
- Nothing on the hot path blocks: `observe_step` increments counters and
  fills histograms (each guarded by prometheus-client's short per-value lock);
  GPU memory is read by the scrape thread, never by the training loop.
- Counters and histograms are created up front, so one that never moves
  (preemptions, S3 retries) is still exported as 0 and queries over it return
  a series from the first scrape on. A gauge appears at its first value: a 0
  loss or a 0 accuracy before anything was measured would be a false reading.
- The exporter is best-effort: a port already in use is one warning and no
  exporter for this process; training goes on.
- Counts made in DataLoader worker processes are not counted there: the
  workers hand them back inside each batch and the main process passes them to
  `count_skipped_images` / `count_s3_retries`, so nothing is lost with the
  workers' copies of the registry.

This module does not write the JSON-lines metrics log; the trainer does.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Iterator
from pathlib import PurePosixPath
from urllib.parse import urlparse

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

LABELS = ("job", "rank", "phase")
PHASES = ("pretrain", "lincls")

# Seconds, from a fast GPU step to a stalled data path.
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DATA_WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                     5.0, 10.0, 30.0)
CHECKPOINT_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)

ADDRESS_ENV = "JCL_METRICS_ADDR"
FINAL_SCRAPE_ENV = "JCL_METRICS_FINAL_SCRAPE_TIMEOUT"
# After the final scrape has begun: time for its reply to leave before the process may exit.
_REPLY_GRACE_SECONDS = 0.2


def job_label(configured: str, output_url: str) -> str:
    """The `job` label: the configured value, else $JCL_JOB_NAME, else the URL's last part."""
    if configured:
        return configured
    from_env = os.environ.get("JCL_JOB_NAME", "")
    if from_env:
        return from_env
    path = urlparse(output_url).path if "://" in output_url else output_url
    name = PurePosixPath(path.rstrip("/")).name
    if not name and "://" in output_url:
        name = urlparse(output_url).netloc
    return name or "jcl"


class TrainingMetrics:
    """The metrics of one training process (one rank), served on /metrics."""

    def __init__(
        self,
        phase: str,
        job: str,
        rank: int,
        local_rank: int,
        base_port: int,
        *,
        addr: str | None = None,
        final_scrape_timeout: float | None = None,
        cuda_device: int | None = None,
    ) -> None:
        """Registers the metrics (labels job, rank, phase) and serves /metrics on
        base_port + local_rank in a background thread; base_port 0 disables serving.
        A port already in use logs one warning and disables serving, never raises.

        addr: bind address; default $JCL_METRICS_ADDR, else 0.0.0.0 (what a pod needs).
        final_scrape_timeout: seconds `close` waits for one more scrape so the final
            values reach Prometheus; default $JCL_METRICS_FINAL_SCRAPE_TIMEOUT, else 0.
        cuda_device: the GPU whose memory is exported; default local_rank when CUDA is
            present. No GPU gauges without CUDA.
        """
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        # The `_created` twin of every counter and histogram doubles the series for nothing
        # the dashboard or the alerts use.
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=True)
        self.port = base_port + local_rank if base_port else 0
        self.addr = addr if addr is not None else os.environ.get(ADDRESS_ENV, "0.0.0.0")
        if final_scrape_timeout is None:
            final_scrape_timeout = float(os.environ.get(FINAL_SCRAPE_ENV, "0") or 0)
        self._final_scrape_timeout = final_scrape_timeout
        self._labels = {"job": job, "rank": str(rank), "phase": phase}
        self._define_metrics()
        self._scraped = threading.Event()
        self.registry.register(_ScrapeWatcher(self._scraped))
        device = _cuda_device(cuda_device, local_rank)
        if device is not None:
            self.registry.register(_GpuMemoryCollector(device, self._labels))
        self._server = None
        self._thread: threading.Thread | None = None
        if self.port:
            self._serve()

    def _define_metrics(self) -> None:
        registry = self.registry
        values = self._labels

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, LABELS, registry=registry).labels(**values)

        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
            # A gauge's child is made at its first value: 0 would be a false reading.
            return Gauge(name, doc, (*LABELS, *extra), registry=registry)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            family = Histogram(name, doc, LABELS, registry=registry, buckets=buckets)
            return family.labels(**values)

        # Progress.
        self._steps = counter("jcl_steps", "Optimizer steps done by this process.")
        self._samples = counter("jcl_samples", "Training samples (images) processed by this rank.")
        self._global_step = gauge("jcl_global_step", "Global step of the run, resumes included.")
        self._epoch = gauge("jcl_epoch", "Current epoch (as counted by the trainer).")
        self._planned_epochs = gauge("jcl_planned_epochs", "Epochs the run is configured for.")
        self._eta = gauge("jcl_eta_seconds", "Estimated seconds until the run finishes.")
        self._world_size = gauge("jcl_world_size", "Processes in the current rendezvous.")
        self._start_time = gauge(
            "jcl_process_start_time_seconds", "Unix time at which this training process started."
        )
        self._set(self._start_time, time.time())

        # Step timing: step_seconds is a whole step, data wait included.
        self._step_seconds = histogram(
            "jcl_step_seconds", "Wall time of one training step, data wait included.",
            STEP_BUCKETS,
        )
        self._data_wait = histogram(
            "jcl_data_wait_seconds", "Part of a step spent waiting for the next batch.",
            DATA_WAIT_BUCKETS,
        )

        # Values logged every log_every steps.
        self._loss = gauge(
            "jcl_loss", "Training loss at the last log step, by term (total, ce, jcl).", ("term",)
        )
        self._nonfinite = counter(
            "jcl_nonfinite_losses", "Log steps at which the total loss was NaN or infinite."
        )
        self._lr = gauge("jcl_learning_rate", "Learning rate at the last log step.")
        self._throughput = gauge(
            "jcl_images_per_second",
            "Throughput of the job as this rank measured it: global batch over step time.",
        )

        # Checkpoints.
        self._checkpoint_seconds = histogram(
            "jcl_checkpoint_save_seconds", "Duration of successful checkpoint saves.",
            CHECKPOINT_BUCKETS,
        )
        self._checkpoint_bytes = gauge(
            "jcl_checkpoint_size_bytes", "Size of the newest checkpoint."
        )
        self._checkpoint_time = gauge(
            "jcl_checkpoint_last_success_timestamp_seconds",
            "Unix time of the newest successful checkpoint save.",
        )
        self._checkpoint_failures = counter(
            "jcl_checkpoint_failures", "Checkpoint saves that failed."
        )

        # Faults.
        self._resumes = counter("jcl_resumes", "Starts that resumed from a checkpoint.")
        self._preemptions = counter(
            "jcl_preemptions", "Preemption signals (SIGTERM) received by this process."
        )
        self._skipped = counter(
            "jcl_skipped_images", "Images skipped because they could not be read or decoded."
        )
        self._s3_retries = counter("jcl_s3_retries", "Retried object-store requests.")

        # Linear evaluation.
        self._accuracy = gauge(
            "jcl_val_accuracy_ratio", "Validation accuracy (0..1) by topk (1, 5).", ("topk",)
        )

    def _set(self, family: Gauge, value: float, **extra: str) -> None:
        family.labels(**self._labels, **extra).set(value)

    def _serve(self) -> None:
        try:
            self._server, self._thread = start_http_server(
                self.port, addr=self.addr, registry=self.registry
            )
        except OSError as error:
            logger.warning(
                "metrics exporter disabled for this process: cannot listen on %s:%d (%s); "
                "training continues without /metrics",
                self.addr, self.port, error.strerror or error,
            )
            self.port = 0
            return
        logger.info("serving Prometheus metrics on http://%s:%d/metrics", self.addr, self.port)

    @property
    def serving(self) -> bool:
        """Whether /metrics is being served."""
        return self._server is not None

    def set_world_size(self, world_size: int) -> None:
        self._set(self._world_size, world_size)

    def set_epoch(self, epoch: int, total_epochs: int) -> None:
        self._set(self._epoch, epoch)
        self._set(self._planned_epochs, total_epochs)

    def observe_step(self, *, samples: int, step_seconds: float, data_wait_seconds: float) -> None:
        """Hot path, once per step on every rank: counters + histograms only, no I/O,
        no locks held long. step_seconds is the whole step, data wait included."""
        self._steps.inc()
        self._samples.inc(samples)
        self._step_seconds.observe(step_seconds)
        self._data_wait.observe(data_wait_seconds)

    def observe_log(
        self,
        *,
        loss: float,
        ce: float | None = None,
        jcl: float | None = None,
        lr: float,
        images_per_second: float,
        eta_seconds: float,
        global_step: int,
    ) -> None:
        """Every log_every steps (rank-local values are fine). ce and jcl may be left
        out where the phase has no such terms (lincls)."""
        for term, value in (("total", loss), ("ce", ce), ("jcl", jcl)):
            if value is not None:
                self._set(self._loss, value, term=term)
        if not math.isfinite(loss):
            self._nonfinite.inc()
        self._set(self._lr, lr)
        self._set(self._throughput, images_per_second)
        self._set(self._eta, eta_seconds)
        self._set(self._global_step, global_step)

    def observe_checkpoint(self, *, seconds: float, size_bytes: int) -> None:
        """A successful checkpoint save."""
        self._checkpoint_seconds.observe(seconds)
        self._set(self._checkpoint_bytes, size_bytes)
        self._set(self._checkpoint_time, time.time())

    def observe_checkpoint_failure(self) -> None:
        self._checkpoint_failures.inc()

    def count_resume(self) -> None:
        self._resumes.inc()

    def count_preemption(self) -> None:
        self._preemptions.inc()

    def count_skipped_images(self, n: int) -> None:
        """Counts reported back by the DataLoader workers inside each batch."""
        if n:
            self._skipped.inc(n)

    def count_s3_retries(self, n: int) -> None:
        if n:
            self._s3_retries.inc(n)

    def observe_accuracy(self, *, top1: float, top5: float) -> None:
        """Linear-evaluation accuracy in percent, exported as a ratio."""
        self._set(self._accuracy, top1 / 100.0, topk="1")
        self._set(self._accuracy, top5 / 100.0, topk="5")

    def close(self) -> None:
        """Stops serving, after waiting up to final_scrape_timeout for one more scrape."""
        if self._server is None:
            return
        if self._final_scrape_timeout > 0:
            self._scraped.clear()
            if self._scraped.wait(self._final_scrape_timeout):
                time.sleep(_REPLY_GRACE_SECONDS)
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None


class _ScrapeWatcher(Collector):
    """Exports nothing; marks that a scrape happened, for `close`."""

    def __init__(self, scraped: threading.Event) -> None:
        self._scraped = scraped

    def collect(self) -> Iterator[GaugeMetricFamily]:
        self._scraped.set()
        return iter(())

    def describe(self) -> list[GaugeMetricFamily]:
        return []


class _GpuMemoryCollector(Collector):
    """GPU memory of one device, read at scrape time (the allocator's counters, no sync)."""

    def __init__(self, device: int, labels: dict[str, str]) -> None:
        self._device = device
        self._labels = labels

    def collect(self) -> Iterator[GaugeMetricFamily]:
        import torch

        names = [*self._labels, "device"]
        values = [*self._labels.values(), str(self._device)]
        readings = {
            "jcl_gpu_memory_allocated_bytes": (
                "GPU memory held by tensors.", torch.cuda.memory_allocated(self._device)),
            "jcl_gpu_memory_reserved_bytes": (
                "GPU memory reserved by the caching allocator.",
                torch.cuda.memory_reserved(self._device)),
            "jcl_gpu_memory_peak_allocated_bytes": (
                "Peak GPU memory held by tensors since start.",
                torch.cuda.max_memory_allocated(self._device)),
        }
        for name, (doc, value) in readings.items():
            family = GaugeMetricFamily(name, doc, labels=names)
            family.add_metric(values, float(value))
            yield family

    def describe(self) -> list[GaugeMetricFamily]:
        return []


def _cuda_device(requested: int | None, local_rank: int) -> int | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    if requested is not None:
        return requested
    return local_rank % torch.cuda.device_count()
