"""`jcl-k8s report` on synthetic metrics logs: the PNG, the summary and the errors."""

import argparse
import io
import json
import math

import fsspec
import pytest
from PIL import Image

from jcl_k8s.observability.cli import add_commands
from jcl_k8s.report import ReportError, read_metrics_log, report, summarize


def pretrain_records(steps: int = 40, epochs: int = 4) -> list[dict]:
    per_epoch = steps // epochs
    return [
        {"phase": "pretrain", "time": 1000.0 + 2 * s, "epoch": (s - 1) // per_epoch,
         "global_step": s, "loss": 8.0 - 0.1 * s, "ce": 7.0 - 0.1 * s, "jcl": 1.0,
         "lr": 0.03 * math.cos(s / steps), "images_per_second": 100.0 + s,
         "data_wait_share": 0.2, "eta_seconds": 2.0 * (steps - s)}
        for s in range(1, steps + 1)
    ]


def lincls_records(epochs: int = 3) -> list[dict]:
    training = [
        {"phase": "lincls", "time": 2000.0 + e, "epoch": e, "global_step": 10 * (e + 1),
         "loss": 2.0 / (e + 1), "lr": 0.5, "images_per_second": 0.0, "data_wait_share": 0.0}
        for e in range(epochs)
    ]
    return [*training, {"phase": "lincls", "time": 2010.0, "epoch": epochs - 1,
                        "top1": 61.5, "top5": 93.25}]


def write_log(run, records: list[dict]) -> str:
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(run)


def decoded(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    image.load()
    return image


def test_report_writes_a_png_beside_the_log_and_summarizes(tmp_path):
    run = write_log(tmp_path / "pre", pretrain_records())
    out, summaries = report(run)
    assert out == f"{run}/report.png"
    png = (tmp_path / "pre" / "report.png").read_bytes()
    assert len(png) > 20_000
    image = decoded(png)
    assert image.format == "PNG" and image.width >= 800 and image.height >= 500

    (pretrain,) = summaries
    assert pretrain.phase == "pretrain"
    assert (pretrain.steps, pretrain.epochs) == (40, 4)
    assert pretrain.final_loss == pytest.approx(4.0)
    assert pretrain.mean_images_per_second == pytest.approx(120.5)
    assert pretrain.mean_data_wait_share == pytest.approx(0.2)
    assert pretrain.seconds == pytest.approx(78.0)
    assert "40 steps" in pretrain.line() and "data wait 20%" in pretrain.line()


def test_a_lincls_run_adds_accuracy_and_more_panels(tmp_path):
    pre = write_log(tmp_path / "pre", pretrain_records())
    lin = write_log(tmp_path / "lin", lincls_records())
    alone, _ = report(pre, out=str(tmp_path / "alone.png"))
    both, summaries = report(pre, lincls_url=lin, out=str(tmp_path / "both.png"))
    assert decoded((tmp_path / "both.png").read_bytes()).height > decoded(
        (tmp_path / "alone.png").read_bytes()).height
    lincls = summaries[1]
    assert lincls.phase == "lincls" and (lincls.top1, lincls.top5) == (61.5, 93.25)
    assert lincls.mean_images_per_second is None  # cached features: throughput not measured
    assert "final top-1 61.50% top-5 93.25%" in lincls.line()


def test_a_lincls_run_on_its_own(tmp_path):
    lin = write_log(tmp_path / "lin", lincls_records())
    _, (summary,) = report(lin)
    assert summary.phase == "lincls" and summary.epochs == 3 and summary.steps == 30
    decoded((tmp_path / "lin" / "report.png").read_bytes())


def test_any_fsspec_url_works_for_log_and_png():
    fs = fsspec.filesystem("memory")
    log = "".join(json.dumps(r) + "\n" for r in pretrain_records())
    fs.pipe("/runs/r1/metrics.jsonl", log.encode())
    out, _ = report("memory://runs/r1", out="memory://reports/r1.png")
    assert out == "memory://reports/r1.png"
    decoded(fs.cat("/reports/r1.png"))


def test_a_missing_log_names_the_url(tmp_path):
    with pytest.raises(ReportError, match=f"no metrics log at {tmp_path}/nothing/metrics.jsonl"):
        read_metrics_log(str(tmp_path / "nothing"))


def test_an_empty_log_names_the_url(tmp_path):
    run = write_log(tmp_path / "empty", [])
    with pytest.raises(ReportError, match=f"metrics log {run}/metrics.jsonl is empty"):
        report(run)


def test_a_garbled_line_is_named(tmp_path):
    run = tmp_path / "bad"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps(pretrain_records()[0]) + "\n{not json\n")
    with pytest.raises(ReportError, match="line 2 is not JSON"):
        read_metrics_log(str(run))


def test_summaries_skip_non_finite_throughput():
    records = pretrain_records(4, 1)
    records[1]["images_per_second"] = math.inf
    (summary,) = summarize(records)
    assert summary.mean_images_per_second == pytest.approx((101 + 103 + 104) / 3)


def test_the_report_subcommand_prints_the_summary(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    pre = write_log(tmp_path / "pre", pretrain_records())
    lin = write_log(tmp_path / "lin", lincls_records())
    args = parser.parse_args(["report", pre, "--lincls", lin, "--out", str(tmp_path / "r.png")])
    assert args.handler(args) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("pretrain: 40 steps, 4 epochs, final loss 4.0000")
    assert printed[1].startswith("lincls: 30 steps, 3 epochs")
    assert printed[2] == f"report: {tmp_path / 'r.png'}"
    decoded((tmp_path / "r.png").read_bytes())
