"""`jcl-k8s report`: a run's curves as one PNG and a short summary, without Grafana.

Reads the JSON-lines metrics log that the trainer writes at `RUN/metrics.jsonl`
(pretrain or lincls records; lincls evaluation records carry top1/top5 in
percent), draws loss, learning rate, throughput and data-wait share against
the global step, and linear-eval accuracy against the epoch when the log (or
an extra lincls run) has it. Any fsspec URL works for the run and the output.
This module neither trains nor talks to Prometheus.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from typing import Any

from jcl_k8s import storage
from jcl_k8s.errors import UserError

LOG_NAME = "metrics.jsonl"
REPORT_NAME = "report.png"
PHASES = ("pretrain", "lincls")


class ReportError(UserError):
    """A run whose metrics log cannot be read, naming its URL."""


@dataclass
class PhaseSummary:
    """What one phase of a run did, from its log records."""

    phase: str
    steps: int
    epochs: int
    final_loss: float | None
    mean_images_per_second: float | None
    mean_data_wait_share: float | None
    seconds: float
    top1: float | None = None
    top5: float | None = None

    def line(self) -> str:
        parts = [f"{self.phase}: {self.steps} steps, {self.epochs} epochs"]
        if self.final_loss is not None:
            parts.append(f"final loss {self.final_loss:.4f}")
        if self.mean_images_per_second is not None:
            parts.append(f"{self.mean_images_per_second:.1f} img/s mean")
        if self.mean_data_wait_share is not None:
            parts.append(f"data wait {100 * self.mean_data_wait_share:.0f}% of step time")
        parts.append(f"{self.seconds:.0f} s")
        if self.top1 is not None:
            parts.append(f"final top-1 {self.top1:.2f}% top-5 {self.top5:.2f}%")
        return ", ".join(parts)


def read_metrics_log(run_url: str) -> list[dict[str, Any]]:
    """The records of RUN_URL/metrics.jsonl; a missing, empty or garbled log is a ReportError."""
    url = storage.join(run_url, LOG_NAME)
    try:
        text = storage.read_text(url)
    except FileNotFoundError:
        raise ReportError(f"no metrics log at {url} (is {run_url} a run directory?)") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ReportError(f"{url} line {number} is not JSON: {error.msg}") from None
        if not isinstance(record, dict) or record.get("phase") not in PHASES:
            raise ReportError(f"{url} line {number} is not a pretrain or lincls record")
        records.append(record)
    if not records:
        raise ReportError(f"the metrics log {url} is empty")
    return records


def summarize(records: list[dict[str, Any]]) -> list[PhaseSummary]:
    """One summary per phase present in the records, pretrain first."""
    summaries = []
    for phase in PHASES:
        mine = [r for r in records if r["phase"] == phase]
        if not mine:
            continue
        training = [r for r in mine if "loss" in r]
        evaluations = [r for r in mine if "top1" in r]
        throughputs = [r["images_per_second"] for r in training
                       if r.get("images_per_second", 0) > 0]
        waits = [r["data_wait_share"] for r in training
                 if "data_wait_share" in r and r.get("images_per_second", 0) > 0]
        times = [r["time"] for r in mine if "time" in r]
        summary = PhaseSummary(
            phase=phase,
            steps=max((int(r.get("global_step", 0)) for r in training), default=0),
            epochs=max((int(r.get("epoch", -1)) for r in mine), default=-1) + 1,
            final_loss=training[-1]["loss"] if training else None,
            mean_images_per_second=_mean(throughputs),
            mean_data_wait_share=_mean(waits),
            seconds=max(times) - min(times) if times else 0.0,
        )
        if evaluations:
            summary.top1, summary.top5 = evaluations[-1]["top1"], evaluations[-1]["top5"]
        summaries.append(summary)
    return summaries


def plot(records: list[dict[str, Any]], title: str = "") -> bytes:
    """The curves as PNG bytes: loss, lr, throughput and data-wait share per phase, against
    the global step, then linear-eval accuracy against the epoch. Throughput and data wait
    are left out for a phase that did not measure them (lincls on cached features logs 0)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels: list[tuple[str, list[tuple[str, list, list]], str]] = []
    for phase in PHASES:
        rows = [r for r in records if r["phase"] == phase and "loss" in r]
        if not rows:
            continue
        terms = [t for t in ("loss", "ce", "jcl") if any(t in r for r in rows)]
        panels.append((f"{phase}: loss", [
            ("total" if term == "loss" else term, *_curve(rows, term)) for term in terms
        ], "global step"))
        panels.append((f"{phase}: learning rate", [("lr", *_curve(rows, "lr"))], "global step"))
        if any(r.get("images_per_second", 0) > 0 for r in rows):
            panels.append((f"{phase}: throughput (images/s)",
                           [("images/s", *_curve(rows, "images_per_second"))], "global step"))
            panels.append((f"{phase}: data-wait share of step time",
                           [("data wait", *_curve(rows, "data_wait_share"))], "global step"))
    evaluations = [r for r in records if "top1" in r]
    if evaluations:
        last = evaluations[-1]
        epochs = [r["epoch"] + 1 for r in evaluations]
        name = f"linear-eval accuracy: top-1 {last['top1']:.1f}%, top-5 {last['top5']:.1f}%"
        panels.append((name, [("top-1 %", epochs, [r["top1"] for r in evaluations]),
                              ("top-5 %", epochs, [r["top5"] for r in evaluations])], "epoch"))

    columns = 2
    rows_count = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(6 * columns, 3.4 * rows_count), layout="constrained")
    FigureCanvasAgg(figure)
    if title:
        figure.suptitle(title)
    for i, (name, lines, xlabel) in enumerate(panels):
        axes = figure.add_subplot(rows_count, columns, i + 1)
        for label, xs, ys in lines:
            axes.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label)
        axes.set_title(name, fontsize="medium")
        axes.set_xlabel(xlabel)
        axes.grid(alpha=0.3)
        if len(lines) > 1:
            axes.legend(fontsize="small")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def report(
    run_url: str, *, lincls_url: str | None = None, out: str | None = None
) -> tuple[str, list[PhaseSummary]]:
    """Writes the PNG (default RUN_URL/report.png); returns its URL and the summaries."""
    records = read_metrics_log(run_url)
    if lincls_url:
        records += [r for r in read_metrics_log(lincls_url) if r["phase"] == "lincls"]
    out = out or storage.join(run_url, REPORT_NAME)
    try:
        png = plot(records, title=run_url.rstrip("/").rsplit("/", 1)[-1])
    except ImportError as error:
        raise ReportError(f"report needs matplotlib ({error}); pip install matplotlib") from None
    storage.write_bytes(out, png)
    return out, summarize(records)


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def _curve(rows: list[dict[str, Any]], key: str) -> tuple[list, list]:
    picked = [r for r in rows if key in r]
    return [r["global_step"] for r in picked], [r[key] for r in picked]
