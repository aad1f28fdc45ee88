"""`jcl-k8s run-local`: run a worker-only elastic PyTorchJob here, one local process per worker.

What a pod would get, each worker gets:
- the environment the training operator injects (PYTHONUNBUFFERED and the PET_* variables,
  with the rendezvous endpoint on 127.0.0.1 at a free port), after the container's own `env`,
  after its `envFrom`; `envFrom`/`secretKeyRef` Secrets are taken from the local environment
  (a missing one is an error naming it);
- the ConfigMaps it mounts as files, in a per-worker folder that stands for the mount path
  (the path is rewritten in the command and arguments), and a private working directory;
- the container's own command, with the local install standing in for the image:
  `jcl-k8s` runs as `python -m jcl_k8s`, `torchrun` as `python -m torch.distributed.run`.

The supervisor follows the replica's restartPolicy: OnFailure restarts a worker that exits
non-zero, ExitCode only one that exits with 128 or more, Never fails the job; restarts count
against runPolicy.backoffLimit. As with the operator, the job succeeds once any worker exits 0,
and the remaining workers are stopped (SIGTERM, then SIGKILL after the grace period) as
cleanPodPolicy Running/All would. A worker's exit ends its whole process tree, as a container's
does. Output lines are prefixed with the pod name: `[jcl-pretrain-worker-0] ...`.

Not emulated: the image itself, resources and node placement, Services (everything is on
127.0.0.1), probes, kubelet back-off timing, and a Master replica (only worker-only elastic
jobs run).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

import jcl_k8s
from jcl_k8s.errors import UserError
from jcl_k8s.k8s.entrypoint import ENTRYPOINT
from jcl_k8s.k8s.validate import describe, webhook_problems
from jcl_k8s.k8s.values import assign, parse_set

DEFAULT_SECRET_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
"""What an `envFrom` Secret stands for locally, unless --secret says otherwise."""
OPTIONAL_SECRET_PREFIX = "AWS_"
"""Further local variables an `envFrom` Secret passes on when they are set."""
PASSED_THROUGH = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TMPDIR", "VIRTUAL_ENV")
"""Local variables every worker keeps so the local install runs (a container has its own)."""
RETRYABLE_EXIT = 128
"""Under restartPolicy ExitCode, exit statuses from here up are retried (the operator's rule)."""


class RunLocalError(UserError):
    """A manifest run-local cannot run, with what to change."""


@dataclass
class WorkerPlan:
    """Everything needed to start one worker replica as a local process."""

    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    files: dict[Path, str] = field(default_factory=dict)


@dataclass
class JobPlan:
    name: str
    workers: list[WorkerPlan]
    restart_policy: str
    backoff_limit: int | None
    grace_seconds: float


# ---------------------------------------------------------------------------- manifests


def load_documents(paths: Sequence[str]) -> list[dict[str, Any]]:
    """Every object in the YAML files (`-` is stdin), in order."""
    documents = []
    for path in paths:
        try:
            text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise RunLocalError(f"manifest {path} does not exist") from None
        try:
            documents += [doc for doc in yaml.safe_load_all(text) if doc]
        except yaml.YAMLError as error:
            raise RunLocalError(f"manifest {path} is not valid YAML: {error}") from None
    return documents


def _siblings(paths: Sequence[str]) -> list[dict[str, Any]]:
    """Objects in the other YAML files beside the given ones (where ConfigMaps usually are)."""
    seen = {Path(p).resolve() for p in paths if p != "-"}
    folders = {Path(p).resolve().parent for p in paths if p != "-"}
    documents = []
    for folder in sorted(folders):
        for path in sorted(folder.glob("*.yaml")):
            if path.resolve() in seen:
                continue
            try:
                loaded = yaml.safe_load_all(path.read_text(encoding="utf-8"))
                documents += [doc for doc in loaded if isinstance(doc, dict)]
            except yaml.YAMLError:
                continue
    return documents


def patch(obj: dict[str, Any], sets: Sequence[str], set_strings: Sequence[str]) -> None:
    """Apply `--set` paths to the manifest object (no schema: any path may be set)."""
    for expression in sets:
        for path, raw in parse_set(expression):
            assign(obj, path, raw, None, force_string=False)
    for expression in set_strings:
        for path, raw in parse_set(expression):
            assign(obj, path, raw, None, force_string=True)


def plan(
    job: dict[str, Any],
    others: Sequence[dict[str, Any]],
    workdir: Path,
    rdzv_port: int,
    environ: dict[str, str],
    train: Sequence[str] = (),
    preset: str | None = None,
    metrics_port: int = 0,
    secrets: dict[str, list[str]] | None = None,
) -> JobPlan:
    """Turn a PyTorchJob into local worker processes; no process is started here."""
    problems = webhook_problems(job)
    if problems:
        raise RunLocalError(problems[0])
    name = job["metadata"]["name"]
    spec = job["spec"]
    replicas = spec["pytorchReplicaSpecs"]
    if set(replicas) != {"Worker"} or "elasticPolicy" not in spec:
        raise RunLocalError(
            f"{describe(job)}: run-local runs worker-only elastic PyTorchJobs "
            f"(elasticPolicy and only a Worker replica spec), got {sorted(replicas)}"
        )
    worker = replicas["Worker"]
    count = int(worker.get("replicas", 1))
    template = worker["template"]
    pod = template["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "pytorch")
    if len(pod["containers"]) > 1:
        raise RunLocalError(f"{describe(job)}: run-local runs only the 'pytorch' container")
    if pod.get("initContainers"):
        raise RunLocalError(f"{describe(job)}: run-local does not run init containers")

    config_maps = {
        obj["metadata"]["name"]: obj for obj in others if obj.get("kind") == "ConfigMap"
    }
    operator_env = operator_environment(spec, count, rdzv_port)
    is_ours = (container.get("command") or list(ENTRYPOINT))[0] == ENTRYPOINT[0]
    nproc = int(operator_env["PET_NPROC_PER_NODE"]) if operator_env[
        "PET_NPROC_PER_NODE"
    ].isdigit() else 1

    workers = []
    for index in range(count):
        pod_name = f"{name}-worker-{index}"
        root = workdir / pod_name
        files, mounts = _mounted_files(job, pod, container, config_maps, root)
        argv = _argv(container, mounts)
        if is_ours:
            argv = _trainer_arguments(argv, train, preset, metrics_port + index * nproc
                                      if metrics_port else 0)
        env = {key: environ[key] for key in PASSED_THROUGH if key in environ}
        package_root = str(Path(jcl_k8s.__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (package_root, environ.get("PYTHONPATH", "")) if p
        )
        env.update(_container_environment(job, pod_name, template, container, environ,
                                          secrets or {}, config_maps))
        env.update(operator_env)
        workers.append(WorkerPlan(pod_name, argv, env, root / "workdir", files))
    grace = float(pod.get("terminationGracePeriodSeconds", 30))
    backoff = (spec.get("runPolicy") or {}).get("backoffLimit")
    return JobPlan(name, workers, worker.get("restartPolicy", "OnFailure"), backoff, grace)


def operator_environment(spec: dict[str, Any], replicas: int, rdzv_port: int) -> dict[str, str]:
    """The variables the training operator adds to a worker-only elastic job's containers."""
    elastic = spec["elasticPolicy"]
    low = elastic.get("minReplicas", elastic.get("maxReplicas", replicas))
    high = elastic.get("maxReplicas", low)
    env = {
        "PYTHONUNBUFFERED": "1",
        "PET_NPROC_PER_NODE": str(spec.get("nprocPerNode", "auto")),
        "PET_NNODES": f"{low}:{high}",
        # Locally every pod is this host; the agent that binds the port first hosts the store.
        "PET_RDZV_ENDPOINT": f"127.0.0.1:{rdzv_port}",
        "PET_RDZV_BACKEND": elastic.get("rdzvBackend", "c10d"),
    }
    if elastic.get("maxRestarts") is not None:
        env["PET_MAX_RESTARTS"] = str(elastic["maxRestarts"])
    if elastic.get("rdzvId"):
        env["PET_RDZV_ID"] = str(elastic["rdzvId"])
    if elastic.get("rdzvConf"):
        env["PET_RDZV_CONF"] = ",".join(f"{c['key']}={c['value']}" for c in elastic["rdzvConf"])
    if elastic.get("standalone"):
        env["PET_STANDALONE"] = ""
    return env


def _mounted_files(
    job: dict[str, Any],
    pod: dict[str, Any],
    container: dict[str, Any],
    config_maps: dict[str, dict[str, Any]],
    root: Path,
) -> tuple[dict[Path, str], dict[str, Path]]:
    """ConfigMap files to write, and each mount path's local stand-in."""
    volumes = {volume["name"]: volume for volume in pod.get("volumes") or []}
    files: dict[Path, str] = {}
    mounts: dict[str, Path] = {}
    for mount in container.get("volumeMounts") or []:
        volume = volumes.get(mount["name"])
        if volume is None:
            raise RunLocalError(f"{describe(job)}: volumeMount {mount['name']!r} has no volume")
        path = mount["mountPath"]
        local = root / "mounts" / path.strip("/")
        if "configMap" in volume:
            source = volume["configMap"]
            config_map = config_maps.get(source["name"])
            if config_map is None:
                if source.get("optional"):
                    continue
                raise RunLocalError(
                    f"{describe(job)} mounts ConfigMap {source['name']!r}, which is in none of "
                    "the given manifests nor beside them (pass its file too)"
                )
            data = config_map.get("data") or {}
            items = source.get("items") or [{"key": key, "path": key} for key in data]
            for item in items:
                if item["key"] not in data:
                    raise RunLocalError(
                        f"ConfigMap {source['name']!r} has no key {item['key']!r}"
                    )
                files[local / item["path"]] = data[item["key"]]
            if mount.get("subPath"):
                local = local / mount["subPath"]
            mounts[path] = local
        elif "emptyDir" in volume:
            if path != "/dev/shm":  # the host's own /dev/shm serves
                files[local / ".keep"] = ""
                mounts[path] = local
        else:
            kind = next((k for k in volume if k != "name"), "?")
            raise RunLocalError(
                f"{describe(job)}: volume {mount['name']!r} is a {kind}; run-local mounts only "
                "configMap and emptyDir volumes"
            )
    return files, mounts


def _argv(container: dict[str, Any], mounts: dict[str, Path]) -> list[str]:
    command = list(container.get("command") or ENTRYPOINT)
    args = list(container.get("args") or [])
    program = command[0]
    if program == "jcl-k8s":
        command[:1] = [sys.executable, "-m", "jcl_k8s"]
    elif program == "torchrun":
        command[:1] = [sys.executable, "-m", "torch.distributed.run"]
    elif program in ("python", "python3"):
        command[:1] = [sys.executable]
    # Longest mount path first, so /etc/a/b is rewritten before /etc/a.
    ordered = sorted(mounts.items(), key=lambda item: -len(item[0]))
    rewritten = []
    for arg in command + args:
        for path, local in ordered:
            if arg == path or arg.startswith(path.rstrip("/") + "/"):
                arg = str(local) + arg[len(path.rstrip("/")):]
                break
        rewritten.append(arg)
    return rewritten


def _trainer_arguments(
    argv: list[str], train: Sequence[str], preset: str | None, metrics_port: int
) -> list[str]:
    """Append trainer overrides (and a preset) to `jcl-k8s launch -- <job> ...`."""
    argv = list(argv)
    if preset is not None:
        argv += ["--preset", preset]
    # Workers share this host's ports: give each its own metrics ports, or none.
    argv.append(f"metrics.port={metrics_port}")
    return argv + list(train)


def _container_environment(
    job: dict[str, Any],
    pod_name: str,
    template: dict[str, Any],
    container: dict[str, Any],
    environ: dict[str, str],
    secrets: dict[str, list[str]],
    config_maps: dict[str, dict[str, Any]],
) -> dict[str, str]:
    """envFrom, then env (later entries win), resolved as the kubelet would, locally."""
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        if "secretRef" in source:
            ref = source["secretRef"]
            names = secrets.get(ref["name"])
            required = names if names is not None else list(DEFAULT_SECRET_VARIABLES)
            missing = [name for name in required if name not in environ]
            if missing and not ref.get("optional"):
                raise RunLocalError(
                    f"{describe(job)} reads Secret {ref['name']!r} (envFrom); locally it is "
                    f"the variables {', '.join(required)}, and these are not set: "
                    f"{', '.join(missing)} (or say which with --secret {ref['name']}=VAR,...)"
                )
            passed = set(required)
            if names is None:
                passed |= {k for k in environ if k.startswith(OPTIONAL_SECRET_PREFIX)}
            env.update({prefix + k: environ[k] for k in sorted(passed) if k in environ})
        elif "configMapRef" in source:
            ref = source["configMapRef"]
            config_map = config_maps.get(ref["name"])
            if config_map is None and not ref.get("optional"):
                raise RunLocalError(f"{describe(job)} reads ConfigMap {ref['name']!r} (envFrom), "
                                    "which is in none of the given manifests")
            env.update({prefix + k: v for k, v in ((config_map or {}).get("data") or {}).items()})
    labels = dict((template.get("metadata") or {}).get("labels") or {})
    fields = {
        "metadata.name": pod_name,
        "metadata.namespace": job["metadata"].get("namespace", "default"),
        "status.podIP": "127.0.0.1",
        "spec.nodeName": socket.gethostname(),
        "spec.serviceAccountName": template["spec"].get("serviceAccountName", "default"),
    }
    for entry in container.get("env") or []:
        name = entry["name"]
        if "value" in entry:
            env[name] = _expand(str(entry["value"]), env)
            continue
        source = entry.get("valueFrom") or {}
        if "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            if path.startswith("metadata.labels['"):
                env[name] = labels.get(path[len("metadata.labels['"):-2], "")
            elif path in fields:
                env[name] = fields[path]
            else:
                raise RunLocalError(f"env {name}: fieldRef {path!r} is not emulated")
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            local = name if name in environ else ref["key"]
            if local in environ:
                env[name] = environ[local]
            elif not ref.get("optional"):
                raise RunLocalError(
                    f"env {name} reads key {ref['key']!r} of Secret {ref['name']!r}; set {name} "
                    "in the local environment"
                )
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            data = (config_maps.get(ref["name"]) or {}).get("data") or {}
            if ref["key"] in data:
                env[name] = data[ref["key"]]
            elif not ref.get("optional"):
                raise RunLocalError(
                    f"env {name} reads key {ref['key']!r} of ConfigMap {ref['name']!r}, "
                    "which the given manifests lack"
                )
        else:
            raise RunLocalError(f"env {name}: {sorted(source)} is not emulated")
    return env


def _expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) references to earlier variables."""
    for key, replacement in env.items():
        value = value.replace(f"$({key})", replacement)
    return value


# ---------------------------------------------------------------------------- running


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_local(
    manifests: Sequence[str],
    sets: Sequence[str] = (),
    set_strings: Sequence[str] = (),
    train: Sequence[str] = (),
    preset: str | None = None,
    timeout: float = 3600.0,
    metrics_port: int = 0,
    secrets: Sequence[str] = (),
    restart_delay: float = 1.0,
    out: IO[str] | None = None,
) -> int:
    """Run the PyTorchJob in `manifests`; 0 when it succeeded, 1 failed, 124 timed out."""
    documents = load_documents(manifests)
    jobs = [doc for doc in documents if doc.get("kind") == "PyTorchJob"]
    if len(jobs) != 1:
        raise RunLocalError(
            f"run-local needs exactly one PyTorchJob in {', '.join(manifests)}, found {len(jobs)}"
        )
    job = jobs[0]
    patch(job, sets, set_strings)
    secret_map = {}
    for item in secrets:
        name, sep, names = item.partition("=")
        if not sep:
            raise RunLocalError(f"--secret {item!r} is not of the form NAME=VAR[,VAR...]")
        secret_map[name] = [n for n in names.split(",") if n]
    others = documents + _siblings(manifests)
    with tempfile.TemporaryDirectory(prefix=f"jcl-run-local-{job['metadata']['name']}-") as tmp:
        job_plan = plan(job, others, Path(tmp), free_port(), dict(os.environ), train, preset,
                        metrics_port, secret_map)
        return Supervisor(job_plan, timeout, restart_delay, out or sys.stdout).run()


class Supervisor:
    """Start the workers, restart them per policy, and decide the job's outcome."""

    def __init__(self, job: JobPlan, timeout: float, restart_delay: float, out: IO[str]):
        self.job = job
        self.timeout = timeout
        self.restart_delay = restart_delay
        self.out = out
        self.lock = threading.Lock()
        self.processes: dict[str, subprocess.Popen] = {}
        self.trees: dict[str, set[tuple[int, str]]] = {}
        self.readers: list[threading.Thread] = []
        self.restarts = 0

    def say(self, text: str) -> None:
        with self.lock:
            self.out.write(f"[run-local] {text}\n")
            self.out.flush()

    def start(self, worker: WorkerPlan) -> None:
        for path, text in worker.files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        worker.cwd.mkdir(parents=True, exist_ok=True)
        process = subprocess.Popen(
            worker.argv, env=worker.env, cwd=worker.cwd, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True,
        )
        self.processes[worker.name] = process
        self.trees[worker.name] = {_identity(process.pid)} - {None}
        reader = threading.Thread(target=self._copy, args=(worker.name, process), daemon=True)
        reader.start()
        self.readers.append(reader)
        self.say(f"{worker.name} started (pid {process.pid}): {' '.join(worker.argv)}")

    def _copy(self, name: str, process: subprocess.Popen) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            with self.lock:
                self.out.write(f"[{name}] {line.rstrip()}\n")
                self.out.flush()

    def run(self) -> int:
        job = self.job
        self.say(
            f"running {job.name}: {len(job.workers)} workers, restartPolicy "
            f"{job.restart_policy}, backoffLimit {job.backoff_limit}"
        )
        deadline = time.monotonic() + self.timeout
        for worker in job.workers:
            self.start(worker)
        pending: dict[str, float] = {}
        try:
            while True:
                for worker in job.workers:
                    self._track(worker.name)
                    process = self.processes.get(worker.name)
                    if process is None or process.poll() is None:
                        continue
                    code = container_status(process.returncode)
                    self._end_tree(worker.name)
                    del self.processes[worker.name]
                    self.say(f"{worker.name} exited with {code}")
                    if code == 0:
                        self.say(f"{job.name} succeeded ({worker.name} completed)")
                        self.stop_all("the job succeeded")
                        return 0
                    verdict = self.retry(code)
                    if verdict:
                        self.say(f"{job.name} failed: {verdict}")
                        self.stop_all("the job failed")
                        return 1
                    self.restarts += 1
                    self.say(f"restarting {worker.name} (restart {self.restarts} of the job)")
                    pending[worker.name] = time.monotonic() + self.restart_delay
                for name, when in list(pending.items()):
                    if time.monotonic() >= when:
                        del pending[name]
                        self.start(next(w for w in job.workers if w.name == name))
                if time.monotonic() > deadline:
                    self.say(f"{job.name} timed out after {self.timeout:.0f} s")
                    self.stop_all("the timeout passed")
                    return 124
                time.sleep(0.2)
        except KeyboardInterrupt:
            self.stop_all("interrupted")
            return 130
        finally:
            for reader in self.readers:
                reader.join(timeout=5)

    def retry(self, code: int) -> str:
        """'' to restart the worker, else why the job fails (the operator's rules)."""
        policy, limit = self.job.restart_policy, self.job.backoff_limit
        if policy == "Never":
            return f"a worker exited with {code} and restartPolicy is Never"
        if policy == "ExitCode" and code < RETRYABLE_EXIT:
            return f"exit status {code} is permanent under restartPolicy ExitCode (< 128)"
        if limit is not None and self.restarts + 1 > limit:
            return f"backoffLimit {limit} reached ({self.restarts} restarts so far)"
        return ""

    def stop_all(self, why: str) -> None:
        """SIGTERM every running worker, SIGKILL what is left after the grace period."""
        running = {n: p for n, p in self.processes.items() if p.poll() is None}
        for name, process in running.items():
            self.say(f"stopping {name} ({why})")
            process.send_signal(signal.SIGTERM)
        end = time.monotonic() + self.job.grace_seconds
        for name, process in running.items():
            try:
                process.wait(timeout=max(end - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                self.say(f"{name} outlived the grace period: killing it")
                process.kill()
                process.wait()
            self.say(f"{name} exited with {container_status(process.returncode)}")
        for name in list(self.processes):
            self._track(name)
            self._end_tree(name)
        self.processes.clear()

    def _track(self, name: str) -> None:
        """Remember every process of a worker's tree (torchrun puts trainers in new sessions)."""
        self.trees[name] |= _descendants(self.trees[name])

    def _end_tree(self, name: str) -> None:
        """Kill what is left of a worker's tree, as the end of a container does."""
        tree = self.trees.get(name, set())
        tree |= _descendants(tree)
        for pid, start in tree:
            if _identity(pid) == (pid, start):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.trees[name] = set()


def container_status(returncode: int) -> int:
    """A process's status as a container reports it: killed by signal S is 128 + S."""
    return 128 - returncode if returncode < 0 else returncode


def _identity(pid: int) -> tuple[int, str] | None:
    """(pid, start time) from /proc, so a reused pid is never mistaken for ours."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return pid, stat.rsplit(")", 1)[1].split()[19]


def _descendants(roots: set[tuple[int, str]]) -> set[tuple[int, str]]:
    """Live processes whose parent chain reaches one of `roots` (Linux /proc; else none)."""
    proc = Path("/proc")
    if not proc.is_dir() or not roots:
        return set()
    parents: dict[int, int] = {}
    for entry in proc.iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int(
                    (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
                )
            except (OSError, IndexError, ValueError):
                continue
    known = {pid for pid, _ in roots}
    found: set[tuple[int, str]] = set()
    changed = True
    while changed:
        changed = False
        for pid, parent in parents.items():
            if parent in known and pid not in known:
                identity = _identity(pid)
                if identity:
                    known.add(pid)
                    found.add(identity)
                    changed = True
    return found
