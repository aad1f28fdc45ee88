"""The container's entrypoint, `jcl-k8s launch -- <pretrain|lincls> ARGS`: the process a pod runs.

It does three things torchrun does not:
1. Checks the trainer's config before anything starts, so bad input exits 2 at once instead of
   becoming torchrun's generic exit 1 after a rendezvous.
2. Waits, bounded, for the rendezvous host in PET_RDZV_ENDPOINT to resolve. A worker-only
   elastic PyTorchJob gets no init container, and worker-0's per-pod Service has a DNS record
   only once that pod is Ready, so the other workers would otherwise fail at once with
   "host not found".
3. Runs `torchrun -m jcl_k8s ARGS` (torchrun takes its node count, rendezvous and processes
   per node from the operator's PET_* variables), forwards SIGTERM/SIGINT to it, and maps its
   exit status:

   ====================================================  =========================
   what happened                                          launch exits
   ====================================================  =========================
   torchrun exited 0 (training complete)                  0
   launch got SIGTERM/SIGINT, then torchrun exited        143 (retryable)
   the trainer's config is invalid                        2 (permanent)
   the rendezvous host did not resolve in time            1
   torchrun exited N (1: a trainer failed for good)       N
   torchrun was killed by signal S                        128 + S
   ====================================================  =========================

   torchrun exits 1 when stopped by SIGTERM, even after its trainers saved a checkpoint and
   exited 143. A pod stopped by the cluster (preemption, eviction, scale-down) must be
   retryable whether or not that last save landed, since training resumes from the newest
   committed checkpoint either way; so a SIGTERM received by launch always maps to 143
   (unless training completed anyway). That keeps `restartPolicy: ExitCode` (>= 128 is
   retried) usable, and is harmless under `OnFailure`.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from jcl_k8s.errors import UserError

ENTRYPOINT = ("jcl-k8s", "launch")
"""The image's ENTRYPOINT and the manifests' container command (tested to agree)."""
COMMANDS = ("pretrain", "lincls")
EXIT_PREEMPTED = 143
EXIT_RENDEZVOUS_DNS = 1

log = logging.getLogger(__name__)


class LaunchError(UserError):
    """The launch arguments cannot be used."""


def exit_status(torchrun_status: int, signalled: bool) -> int:
    """The pod's exit status for torchrun's `Popen.returncode` (negative: killed by a signal)."""
    if torchrun_status == 0:
        return 0
    if signalled:
        return EXIT_PREEMPTED
    if torchrun_status < 0:
        return 128 - torchrun_status
    return torchrun_status


def rendezvous_host(endpoint: str) -> str:
    """The host part of `host:port`, `[v6]:port` or `host`."""
    if endpoint.startswith("["):
        return endpoint[1 : endpoint.index("]")]
    host, sep, port = endpoint.rpartition(":")
    return host if sep and port.isdigit() else endpoint


def wait_for_dns(
    host: str,
    timeout: float,
    interval: float = 2.0,
    resolve: Callable[[str, None], object] = socket.getaddrinfo,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    stopped: Callable[[], bool] = lambda: False,
) -> bool:
    """Retry resolving `host` until it resolves (True), or `timeout` passes or `stopped()`."""
    start = clock()
    next_report = start
    while not stopped():
        try:
            resolve(host, None)
            return True
        except (socket.gaierror, UnicodeError):
            pass
        waited = clock() - start
        if waited >= timeout:
            return False
        if clock() >= next_report:
            log.info("waiting for rendezvous host %s to resolve (%.0f of %.0f s)", host, waited,
                     timeout)
            next_report = clock() + 30
        sleep(min(interval, timeout - waited))
    return False


def check_trainer_args(args: Sequence[str]) -> None:
    """Parse and load the trainer's config as the trainer would; ConfigError on bad input."""
    from jcl_k8s.cli import build_parser
    from jcl_k8s.config import load_config

    if not args or args[0] not in COMMANDS:
        raise LaunchError(
            f"launch runs {' or '.join(COMMANDS)}: jcl-k8s launch [--dns-timeout S] -- "
            f"pretrain --config FILE [key=value ...], got {list(args)}"
        )
    parsed = build_parser().parse_args(list(args))
    load_config(parsed.command, parsed.preset, parsed.config, parsed.overrides)


def torchrun_command(args: Sequence[str]) -> list[str]:
    """`torchrun -m jcl_k8s ARGS` with this interpreter; torchrun reads PET_* itself."""
    return [sys.executable, "-m", "torch.distributed.run", "-m", "jcl_k8s", *args]


def launch(args: Sequence[str], dns_timeout: float) -> int:
    """Check, wait for the rendezvous host, run torchrun; the pod's exit status."""
    args = list(args[1:] if args and args[0] == "--" else args)
    check_trainer_args(args)

    received: list[int] = []
    child: list[subprocess.Popen] = []

    def forward(signum: int, _frame: object) -> None:
        received.append(signum)
        log.info("received %s, forwarding it to torchrun", signal.Signals(signum).name)
        if child and child[0].poll() is None:
            child[0].send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        endpoint = os.environ.get("PET_RDZV_ENDPOINT", "")
        if endpoint:
            host = rendezvous_host(endpoint)
            resolved = wait_for_dns(host, dns_timeout, sleep=_sleep_unless(received),
                                    stopped=lambda: bool(received))
            if received:
                return EXIT_PREEMPTED
            if not resolved:
                log.error(
                    "rendezvous host %s did not resolve within %.0f s (is pod %s scheduled? "
                    "raise rendezvous.dnsTimeoutSeconds to wait longer)", host, dns_timeout, host,
                )
                return EXIT_RENDEZVOUS_DNS
        if received:
            return EXIT_PREEMPTED

        command = torchrun_command(args)
        pet = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("PET_"))
        log.info("starting %s (%s)", " ".join(command[1:]), pet or "no PET_* variables")
        child.append(subprocess.Popen(command))
        status = child[0].wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    code = exit_status(status, bool(received))
    log.info("torchrun exited with %s; launch exits %d", status, code)
    return code


def _sleep_unless(received: list[int]) -> Callable[[float], None]:
    """A sleep that returns early once a signal was received (so SIGTERM ends the DNS wait)."""

    def sleep(seconds: float) -> None:
        end = time.monotonic() + seconds
        while not received and time.monotonic() < end:
            time.sleep(min(0.1, seconds))

    return sleep
