"""A real Prometheus scrapes a 2-process torchrun pretrain and its lincls, every second.

One module-scoped run (about a minute on 2 cores): Debian's `prometheus` on
127.0.0.1 with a generated config, a tiny Fashion-MNIST set, `torchrun
--nproc-per-node 2` pretrain then lincls with the exporters on free ports.
The lincls run's second process finds its port taken. The tests then ask
Prometheus's HTTP API about what it stored.
"""

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from jcl_k8s.observability.dashboard import grafana_dashboard, panel_queries, resolve_variables
from jcl_k8s.observability.rules import rule_groups
from tests.conftest import REPO, free_port

pytestmark = pytest.mark.integration

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
NAMESPACE = "jcl-e2e"
PRETRAIN_JOB, LINCLS_JOB = "pre", "lin"
BATCH, EPOCHS, TRAIN_IMAGES = 32, 2, 200
RUN_TIMEOUT = 300


def port_pair() -> int:
    """A port p with p and p + 1 both free on 127.0.0.1."""
    for _ in range(50):
        base = free_port()
        try:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", base + 1))
        except OSError:
            continue
        return base
    raise RuntimeError("no two consecutive free ports")


class Prometheus:
    """A `prometheus` server on 127.0.0.1, killed when the module's tests are done."""

    def __init__(self, workdir: Path, targets: list[str], rules: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                       "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [{
                "job_name": "jcl-training",
                # The trainer's own `job` label wins, as with the PodMonitor's honorLabels.
                "honor_labels": True,
                "static_configs": [{"targets": targets, "labels": {"namespace": NAMESPACE}}],
            }],
        }
        config_file = workdir / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config))
        self.log = (workdir / "prometheus.log").open("w")
        self.process = subprocess.Popen(
            [shutil.which("prometheus"), f"--config.file={config_file}",
             f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"prometheus did not start: {(workdir / 'prometheus.log')}")
            time.sleep(0.2)

    def api(self, path: str, **params: str) -> dict:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=30) as reply:
            answer = json.load(reply)
        assert answer["status"] == "success", answer
        return answer["data"]

    def range_query(self, expr: str, start: float, end: float) -> list[dict]:
        return self.api("query_range", query=expr, start=str(start), end=str(end), step="1")[
            "result"]

    def instant(self, expr: str, at: float) -> list[dict]:
        return self.api("query", query=expr, time=str(at))["result"]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def torchrun(command: str, base_port: int, overrides: list[str], env: dict[str, str],
             log: Path) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            "2", "-m", "jcl_k8s", command, "--preset", "small", f"metrics.port={base_port}",
            *overrides]
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=RUN_TIMEOUT)
    log.write_text(result.stdout + result.stderr)
    return result


@pytest.fixture(scope="module")
def observed_run(tmp_path_factory):
    """Prepares data, starts Prometheus, runs pretrain and lincls; yields what happened."""
    if shutil.which("prometheus") is None:
        pytest.skip("Debian's prometheus server is not installed")
    if not FASHION_MNIST.exists():
        pytest.skip(f"{FASHION_MNIST} is missing (Debian package dataset-fashion-mnist)")
    work = tmp_path_factory.mktemp("prometheus-e2e")
    data, runs = work / "data", work / "runs"
    env = {**os.environ, "JCL_METRICS_ADDR": "127.0.0.1", "JCL_METRICS_FINAL_SCRAPE_TIMEOUT": "5",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("JCL_JOB_NAME", None)
    subprocess.run([sys.executable, "-m", "jcl_k8s", "prepare-data", "fashion-mnist", str(data),
                    "--per-class", str(TRAIN_IMAGES // 10), "--val-per-class", "5"],
                   cwd=REPO, env=env, check=True, capture_output=True, timeout=120)

    pretrain_port, lincls_port = port_pair(), port_pair()
    rules = work / "rules.yaml"
    rules.write_text(yaml.safe_dump(rule_groups(), sort_keys=False))
    targets = [f"127.0.0.1:{p}" for p in
               (pretrain_port, pretrain_port + 1, lincls_port, lincls_port + 1)]
    prometheus = Prometheus(work, targets, rules)
    taken = socket.socket()
    try:
        started = time.time()
        pretrain = torchrun(
            "pretrain", pretrain_port,
            [f"data.url={data}", f"output_url={runs / PRETRAIN_JOB}", f"epochs={EPOCHS}",
             f"batch_size={BATCH}", "log_every=1", "queue_size=256"],
            env, work / "pretrain.log",
        )
        # Lincls's second process finds its exporter port in use.
        taken.bind(("127.0.0.1", lincls_port + 1))
        taken.listen()
        lincls = torchrun(
            "lincls", lincls_port,
            [f"data.url={data}", f"output_url={runs / LINCLS_JOB}",
             f"pretrained={runs / PRETRAIN_JOB}", "epochs=5"],
            env, work / "lincls.log",
        )
        ended = time.time()
        time.sleep(2)  # the last scrapes and rule evaluations land
        yield {"prometheus": prometheus, "pretrain": pretrain, "lincls": lincls,
               "start": started, "end": ended, "runs": runs, "work": work, "env": env,
               "lincls_port": lincls_port}
    finally:
        taken.close()
        prometheus.stop()


def test_both_runs_complete(observed_run):
    for name in ("pretrain", "lincls"):
        result = observed_run[name]
        assert result.returncode == 0, f"{name} failed:\n{result.stderr[-4000:]}"
    assert (observed_run["runs"] / LINCLS_JOB / "results.json").exists()


def test_a_taken_port_is_a_warning_and_training_completes(observed_run):
    lincls = observed_run["lincls"]
    assert lincls.returncode == 0
    port = observed_run["lincls_port"] + 1
    warnings = [line for line in (lincls.stdout + lincls.stderr).splitlines()
                if "WARNING" in line and "metrics exporter disabled" in line]
    assert len(warnings) == 1 and f":{port}" in warnings[0], warnings
    prometheus = observed_run["prometheus"]
    ranks = prometheus.instant(
        f'count by (rank) (max_over_time(jcl_steps_total{{job="{LINCLS_JOB}"}}[10m]))',
        observed_run["end"])
    assert {series["metric"]["rank"] for series in ranks} == {"0"}


def test_samples_summed_over_ranks_equal_the_samples_trained(observed_run):
    assert observed_run["pretrain"].returncode == 0
    records = [json.loads(line) for line in
               (observed_run["runs"] / PRETRAIN_JOB / "metrics.jsonl").read_text().splitlines()]
    steps = records[-1]["global_step"]
    assert steps == EPOCHS * (TRAIN_IMAGES // BATCH)  # full global batches only
    prometheus, end = observed_run["prometheus"], observed_run["end"]
    selector = f'job="{PRETRAIN_JOB}", namespace="{NAMESPACE}"'
    per_rank = prometheus.instant(f"max_over_time(jcl_samples_total{{{selector}}}[10m])", end)
    assert sorted(s["metric"]["rank"] for s in per_rank) == ["0", "1"]
    assert sum(float(s["value"][1]) for s in per_rank) == steps * BATCH
    step_counts = prometheus.instant(f"max_over_time(jcl_steps_total{{{selector}}}[10m])", end)
    assert [float(s["value"][1]) for s in step_counts] == [steps, steps]


def test_every_dashboard_expression_returns_series(observed_run):
    assert observed_run["pretrain"].returncode == 0 and observed_run["lincls"].returncode == 0
    prometheus = observed_run["prometheus"]
    variables = {"namespace": NAMESPACE, "job": f"{PRETRAIN_JOB}|{LINCLS_JOB}",
                 "__rate_interval": "5s"}
    empty, gpu_only = [], []
    for title, expr in panel_queries(grafana_dashboard()):
        if "jcl_gpu_" in expr and not _cuda():
            gpu_only.append(title)  # GPU memory is exported only where CUDA is present
            continue
        query = resolve_variables(expr, variables)
        result = prometheus.range_query(query, observed_run["start"], observed_run["end"] + 2)
        finite = [s for s in result
                  if any(math.isfinite(float(v)) for _, v in s["values"])]
        if not finite:
            empty.append(f"{title}: {query}")
    assert not empty, "panels without data:\n" + "\n".join(empty)
    assert gpu_only in ([], ["GPU memory"] * 3)


def test_dashboard_variables_find_the_namespace_and_jobs(observed_run):
    prometheus = observed_run["prometheus"]
    for variable in grafana_dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        metric_and_label = variable["query"][len("label_values("):-1]
        selector, label = (part.strip() for part in metric_and_label.rsplit(",", 1))
        selector = resolve_variables(selector, {"namespace": NAMESPACE})
        values = prometheus.api(f"label/{label}/values", **{
            "match[]": selector, "start": str(observed_run["start"]),
            "end": str(observed_run["end"] + 2)})
        expected = {NAMESPACE} if label == "namespace" else {PRETRAIN_JOB, LINCLS_JOB}
        assert expected <= set(values), (variable["name"], values)


def test_the_alert_rules_evaluate_cleanly_on_real_series(observed_run):
    groups = observed_run["prometheus"].api("rules")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) == sum(len(g["rules"]) for g in rule_groups()["groups"])
    assert all(rule["health"] == "ok" for rule in rules), [
        (rule["name"], rule.get("lastError")) for rule in rules if rule["health"] != "ok"]
    firing = [rule["name"] for rule in rules if rule.get("state") == "firing"]
    assert firing == [], f"a healthy run set off {firing}"


def test_report_draws_the_run(observed_run):
    runs, work = observed_run["runs"], observed_run["work"]
    out = work / "report.png"
    result = subprocess.run(
        [sys.executable, "-m", "jcl_k8s", "report", str(runs / PRETRAIN_JOB), "--lincls",
         str(runs / LINCLS_JOB), "--out", str(out)],
        cwd=REPO, env=observed_run["env"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"pretrain: {EPOCHS * (TRAIN_IMAGES // BATCH)} steps")
    assert "final top-1" in lines[1]
    from PIL import Image

    assert out.stat().st_size > 20_000
    with Image.open(out) as image:
        image.load()
        assert image.format == "PNG" and image.width >= 800


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
