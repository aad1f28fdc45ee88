"""TrainingMetrics: names, labels and values as scraped over HTTP, the port rules, close."""

import logging
import math
import threading
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from jcl_k8s.metrics import TrainingMetrics, job_label
from tests.conftest import free_port


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch):
    monkeypatch.setenv("JCL_METRICS_ADDR", "127.0.0.1")
    monkeypatch.delenv("JCL_METRICS_FINAL_SCRAPE_TIMEOUT", raising=False)


@pytest.fixture
def metrics():
    made = []

    def make(**kwargs) -> TrainingMetrics:
        arguments = {"phase": "pretrain", "job": "run-a", "rank": 0, "local_rank": 0,
                     "base_port": free_port(), **kwargs}
        made.append(TrainingMetrics(**arguments))
        return made[-1]

    yield make
    for m in made:
        m.close()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample on http://127.0.0.1:port/metrics, keyed by name and sorted labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples, name: str, **labels: str) -> float:
    wanted = {"job": "run-a", "rank": "0", "phase": "pretrain", **labels}
    return samples[(name, tuple(sorted(wanted.items())))]


@pytest.mark.parametrize(
    ("configured", "env", "url", "expected"),
    [
        ("mine", "from-env", "s3://b/runs/x", "mine"),
        ("", "from-env", "s3://b/runs/x", "from-env"),
        ("", "", "s3://bucket/runs/pretrain-1/", "pretrain-1"),
        ("", "", "/tmp/runs/lincls", "lincls"),
        ("", "", "file:///tmp/runs/r2", "r2"),
        ("", "", "s3://bucket", "bucket"),
    ],
)
def test_job_label_follows_the_config_rule(monkeypatch, configured, env, url, expected):
    monkeypatch.setenv("JCL_JOB_NAME", env)
    assert job_label(configured, url) == expected


def test_values_reach_the_scrape_with_job_rank_phase_labels(metrics):
    m = metrics(rank=3)
    m.set_world_size(4)
    m.set_epoch(2, 10)
    for _ in range(5):
        m.observe_step(samples=32, step_seconds=0.2, data_wait_seconds=0.05)
    m.observe_log(loss=4.5, ce=3.0, jcl=1.5, lr=0.03, images_per_second=160.0,
                  eta_seconds=600.0, global_step=105)
    m.observe_checkpoint(seconds=2.0, size_bytes=1234)
    m.observe_checkpoint_failure()
    m.count_resume()
    m.count_preemption()
    m.count_skipped_images(3)
    m.count_s3_retries(2)

    samples = scrape(m.port)
    v = lambda name, **extra: value(samples, name, rank="3", **extra)  # noqa: E731
    assert v("jcl_steps_total") == 5
    assert v("jcl_samples_total") == 160
    assert v("jcl_world_size") == 4
    assert (v("jcl_epoch"), v("jcl_planned_epochs")) == (2, 10)
    assert v("jcl_step_seconds_count") == 5
    assert v("jcl_step_seconds_sum") == pytest.approx(1.0)
    assert v("jcl_step_seconds_bucket", le="0.25") == 5
    assert v("jcl_data_wait_seconds_sum") == pytest.approx(0.25)
    assert [v("jcl_loss", term=t) for t in ("total", "ce", "jcl")] == [4.5, 3.0, 1.5]
    assert v("jcl_learning_rate") == 0.03
    assert v("jcl_images_per_second") == 160
    assert v("jcl_eta_seconds") == 600
    assert v("jcl_global_step") == 105
    assert v("jcl_checkpoint_save_seconds_count") == 1
    assert v("jcl_checkpoint_size_bytes") == 1234
    assert time.time() - v("jcl_checkpoint_last_success_timestamp_seconds") < 60
    assert v("jcl_checkpoint_failures_total") == 1
    assert v("jcl_resumes_total") == v("jcl_preemptions_total") == 1
    assert v("jcl_skipped_images_total") == 3
    assert v("jcl_s3_retries_total") == 2
    assert v("jcl_nonfinite_losses_total") == 0
    assert time.time() - v("jcl_process_start_time_seconds") < 60
    assert not any(name.endswith("_created") for name, _ in samples)


def test_counters_exist_at_zero_and_gauges_only_once_measured(metrics):
    m = metrics()
    names = {name for name, _ in scrape(m.port)}
    assert {"jcl_steps_total", "jcl_preemptions_total", "jcl_s3_retries_total",
            "jcl_step_seconds_count", "jcl_process_start_time_seconds"} <= names
    assert not names & {"jcl_loss", "jcl_val_accuracy_ratio", "jcl_world_size",
                        "jcl_checkpoint_last_success_timestamp_seconds"}


def test_lincls_exports_accuracy_as_a_ratio_and_only_the_total_loss(metrics):
    m = metrics(phase="lincls")
    m.observe_log(loss=1.2, lr=0.5, images_per_second=900.0, eta_seconds=5.0, global_step=7)
    m.observe_accuracy(top1=71.5, top5=90.0)
    samples = scrape(m.port)
    assert value(samples, "jcl_val_accuracy_ratio", phase="lincls", topk="1") == 0.715
    assert value(samples, "jcl_val_accuracy_ratio", phase="lincls", topk="5") == 0.9
    terms = {dict(labels)["term"] for name, labels in samples if name == "jcl_loss"}
    assert terms == {"total"}


def test_a_non_finite_loss_is_counted(metrics):
    m = metrics()
    m.observe_log(loss=math.nan, ce=math.nan, jcl=0.1, lr=0.1, images_per_second=1.0,
                  eta_seconds=1.0, global_step=1)
    m.observe_log(loss=math.inf, ce=1.0, jcl=0.1, lr=0.1, images_per_second=1.0,
                  eta_seconds=1.0, global_step=2)
    samples = scrape(m.port)
    assert value(samples, "jcl_nonfinite_losses_total") == 2
    assert value(samples, "jcl_loss", term="total") == math.inf


def test_each_local_rank_serves_on_base_port_plus_local_rank(metrics):
    base = free_port()
    ranks = [metrics(base_port=base, local_rank=i, rank=i) for i in range(2)]
    assert [m.port for m in ranks] == [base, base + 1]
    for m in ranks:
        if m.serving:  # base + 1 may happen to be taken by something else on this machine
            assert value(scrape(m.port), "jcl_steps_total", rank=str(m.port - base)) == 0


def test_a_port_in_use_is_one_warning_and_no_exporter(metrics, caplog):
    port = free_port()
    first = metrics(base_port=port)
    with caplog.at_level(logging.WARNING, logger="jcl_k8s.metrics"):
        second = metrics(base_port=port, rank=1)
        second.observe_step(samples=8, step_seconds=0.1, data_wait_seconds=0.0)
        second.observe_log(loss=1.0, ce=1.0, jcl=0.0, lr=0.1, images_per_second=1.0,
                           eta_seconds=1.0, global_step=1)
        second.close()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(port) in warnings[0].getMessage()
    assert not second.serving and second.port == 0
    assert value(scrape(first.port), "jcl_steps_total") == 0  # the first one still serves


def test_port_zero_serves_nothing(metrics):
    m = metrics(base_port=0, local_rank=2)
    m.observe_step(samples=1, step_seconds=0.1, data_wait_seconds=0.0)
    assert not m.serving and m.port == 0


def test_close_stops_the_server_and_frees_the_port(metrics):
    m = metrics()
    port = m.port
    scrape(port)
    m.close()
    with pytest.raises(urllib.error.URLError):
        scrape(port)
    again = metrics(base_port=port)
    assert again.serving
    m.close()  # a second close is harmless


def test_close_waits_for_one_final_scrape(metrics):
    m = metrics(final_scrape_timeout=10.0)
    m.observe_step(samples=5, step_seconds=0.1, data_wait_seconds=0.0)
    seen = []

    def late_scrape():
        time.sleep(0.5)
        seen.append(scrape(m.port))

    scraper = threading.Thread(target=late_scrape)
    scraper.start()
    started = time.monotonic()
    m.close()
    waited = time.monotonic() - started
    scraper.join()
    assert 0.4 < waited < 5
    assert value(seen[0], "jcl_samples_total") == 5


def test_close_gives_up_waiting_after_the_timeout(metrics):
    m = metrics(final_scrape_timeout=0.3)
    started = time.monotonic()
    m.close()
    assert time.monotonic() - started < 2


def test_the_step_hot_path_is_cheap(metrics):
    m = metrics()
    n = 20_000
    started = time.perf_counter()
    for _ in range(n):
        m.observe_step(samples=64, step_seconds=0.12, data_wait_seconds=0.003)
    per_step = (time.perf_counter() - started) / n
    assert per_step < 100e-6, f"observe_step took {per_step * 1e6:.1f} us"
    assert value(scrape(m.port), "jcl_samples_total") == 64 * n


def test_several_instances_in_one_process_have_separate_registries(metrics):
    a, b = metrics(), metrics(rank=1)
    a.observe_step(samples=10, step_seconds=0.1, data_wait_seconds=0.0)
    assert value(scrape(a.port), "jcl_samples_total") == 10
    assert value(scrape(b.port), "jcl_samples_total", rank="1") == 0


def test_unknown_phase_is_refused():
    with pytest.raises(ValueError, match="phase"):
        TrainingMetrics("train", "j", 0, 0, 0)
