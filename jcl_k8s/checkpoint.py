"""Checkpoints at any fsspec URL: the committed layout, loading, and formats.

Layout under a run URL:

    RUN/checkpoints/step-000001234/state.pt   torch.save of the state dict
    RUN/checkpoints/step-000001234/COMMIT     JSON {sha256, bytes, ...}, written last
    RUN/final.json                            written once training is complete

S3 has no rename, so a checkpoint becomes valid only when its COMMIT object
exists; readers ignore prefixes without one, and a state whose size or
checksum does not match its COMMIT is skipped with a warning, falling back to
the previous committed checkpoint. Loading uses `weights_only=True`: a
checkpoint in a bucket cannot run code.

State-dict formats understood by `backbone_state_dict`:
- this project's: `state_dict` keys `query_encoder.<resnet key>`,
  `key_encoder.<resnet key>`, `queue`, `queue_ptr` (fc.* is the projection head);
- the published MoCo / JCL format: the same under `module.encoder_q.` /
  `module.encoder_k.` / `module.queue`;
- a plain torchvision ResNet state dict (what `export` writes).
"""

import hashlib
import io
import json
import logging
import threading
import time
from typing import Any

import torch

from jcl_k8s import storage
from jcl_k8s.errors import CheckpointError

log = logging.getLogger(__name__)

FORMAT = "jcl-k8s/1"
STATE_FILE = "state.pt"
COMMIT_FILE = "COMMIT"
FINAL_FILE = "final.json"


def checkpoint_name(global_step: int) -> str:
    return f"step-{global_step:09d}"


def serialize(state: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def save(run_url: str, global_step: int, state: dict[str, Any], epoch_end: bool = False) -> str:
    """Write `state` as a committed checkpoint of `run_url`; returns its URL."""
    return commit(run_url, global_step, serialize(state), state, epoch_end)


def commit(
    run_url: str, global_step: int, data: bytes, state: dict[str, Any], epoch_end: bool = False
) -> str:
    """Upload `data` under its own prefix, then the COMMIT marker that makes it valid."""
    url = storage.join(run_url, "checkpoints", checkpoint_name(global_step))
    storage.write_bytes(storage.join(url, STATE_FILE), data)
    marker = {
        "format": FORMAT,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "epoch": state.get("epoch"),
        "global_step": global_step,
        "epoch_end": epoch_end,
        "created": time.time(),
    }
    storage.write_text(storage.join(url, COMMIT_FILE), json.dumps(marker))
    return url


def prune(run_url: str, keep_last: int, keep_every_epochs: int = 0) -> list[str]:
    """Delete all but the newest `keep_last` committed checkpoints (and every Nth
    epoch's end, when asked), plus uncommitted leftovers older than the newest
    commit. Only ever called after a commit; returns the deleted URLs."""
    fs, base = storage.url_to_fs(storage.join(run_url, "checkpoints"))
    with storage.explained(run_url, "pruning checkpoints of"):
        fs.invalidate_cache()
        names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(base, detail=False))
        kept = [n for n in names if fs.exists(f"{base}/{n}/{COMMIT_FILE}")]
        if not kept:
            return []
        keep = set(kept[-keep_last:])
        if keep_every_epochs > 0:
            for name in kept:
                marker = json.loads(fs.cat_file(f"{base}/{name}/{COMMIT_FILE}"))
                epoch = marker.get("epoch") or 0
                if marker.get("epoch_end") and epoch % keep_every_epochs == 0:
                    keep.add(name)
        doomed = [n for n in names if n not in keep and n < kept[-1]]
        for name in doomed:
            fs.rm(f"{base}/{name}", recursive=True)
    return [storage.join(run_url, "checkpoints", n) for n in doomed]


class Snapshot:
    """Copies a (nested) state into CPU buffers that are allocated once and reused.

    Copying into buffers that already exist is all a save stalls training for
    (no allocation, no page faults; pinned memory when CUDA is present); the
    copy is then serialised and uploaded in the background. A buffer is only
    reused once the upload that read it has finished.
    """

    def __init__(self):
        self._buffers: dict[tuple, torch.Tensor] = {}

    def __call__(self, value: Any, path: tuple = ()) -> Any:
        if isinstance(value, torch.Tensor):
            buffer = self._buffers.get(path)
            if buffer is None or buffer.shape != value.shape or buffer.dtype != value.dtype:
                buffer = torch.empty(value.shape, dtype=value.dtype, device="cpu",
                                     pin_memory=torch.cuda.is_available())
                self._buffers[path] = buffer
            return buffer.copy_(value.detach(), non_blocking=True)
        if isinstance(value, dict):
            return {k: self(v, (*path, k)) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self(v, (*path, i)) for i, v in enumerate(value))
        return value


class BackgroundWriter:
    """Uploads snapshots one at a time in a background thread (rank 0 only).

    A new save first waits for the previous upload, so uploads never pile up.
    A failed background upload is logged and counted and the next save tries
    again; a save that is waited for (the final one, a preemption) raises.
    """

    def __init__(self, run_url: str, keep_last: int, keep_every_epochs: int = 0,
                 on_saved=None, on_failed=None):
        self.run_url = run_url
        self.keep_last = keep_last
        self.keep_every_epochs = keep_every_epochs
        self.on_saved = on_saved
        self.on_failed = on_failed
        self.last_url = ""
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._snapshot = Snapshot()

    def save(self, global_step: int, state: dict[str, Any], epoch_end: bool = False,
             wait: bool = False) -> float:
        """Snapshot `state` and upload it; returns the seconds training was stalled."""
        self.wait(raise_error=False)
        started = time.perf_counter()
        copy = self._snapshot(state)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        stalled = time.perf_counter() - started
        self._thread = threading.Thread(
            target=self._upload, args=(global_step, copy, epoch_end), daemon=True,
            name=f"checkpoint-{global_step}",
        )
        self._thread.start()
        if wait:
            self.wait(raise_error=True)
        return stalled

    def wait(self, raise_error: bool = True) -> None:
        """Block until the upload in flight, if any, is done."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            if raise_error:
                raise error
            log.error("checkpoint upload failed (the next save tries again): %s", error)

    def _upload(self, global_step: int, state: dict[str, Any], epoch_end: bool) -> None:
        started = time.perf_counter()
        try:
            data = serialize(state)
            url = commit(self.run_url, global_step, data, state, epoch_end)
            prune(self.run_url, self.keep_last, self.keep_every_epochs)
        except Exception as error:  # reported by wait(): logged, or raised to the caller
            self._error = error
            if self.on_failed:
                self.on_failed()
            return
        seconds = time.perf_counter() - started
        self.last_url = url
        log.info("checkpoint committed: %s (%.1f MB in %.1f s)", url, len(data) / 2**20, seconds)
        if self.on_saved:
            self.on_saved(seconds, len(data))


def committed(run_url: str) -> list[str]:
    """URLs of the run's checkpoints that have a COMMIT marker, oldest first."""
    fs, path = storage.url_to_fs(storage.join(run_url, "checkpoints"))
    with storage.explained(run_url, "listing checkpoints of"):
        fs.invalidate_cache()
        if not fs.exists(path):
            return []
        markers = [p for p in fs.find(path) if p.endswith("/" + COMMIT_FILE)]
    names = sorted(p.rsplit("/", 2)[-2] for p in markers)
    return [storage.join(run_url, "checkpoints", name) for name in names]


def _read_verified(checkpoint_url: str) -> bytes:
    marker_url = storage.join(checkpoint_url, COMMIT_FILE)
    try:
        marker = json.loads(storage.read_text(marker_url))
        expected_sha, expected_bytes = marker["sha256"], int(marker["bytes"])
    except (FileNotFoundError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{marker_url} is not a valid commit marker ({error})") from None
    try:
        data = storage.read_bytes(storage.join(checkpoint_url, STATE_FILE))
    except FileNotFoundError:
        raise CheckpointError(f"{checkpoint_url} is committed but has no {STATE_FILE}") from None
    if len(data) != expected_bytes:
        raise CheckpointError(
            f"{checkpoint_url}/{STATE_FILE} has {len(data)} bytes, its commit says {expected_bytes}"
        )
    if hashlib.sha256(data).hexdigest() != expected_sha:
        raise CheckpointError(f"{checkpoint_url}/{STATE_FILE} does not match its checksum")
    return data


def _deserialize(data: bytes, url: str) -> dict[str, Any]:
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types for a non-checkpoint
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        if "Weights only load failed" in reason:
            reason = "it holds objects that weights_only loading refuses to unpickle"
        raise CheckpointError(
            f"{url} is not a checkpoint this tool can load "
            f"({type(error).__name__}{': ' + reason if reason else ''})"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{url} holds a {type(state).__name__}, not a checkpoint dict")
    return state


def load_latest(run_url: str) -> tuple[str, dict[str, Any]] | None:
    """The newest intact committed checkpoint of a run, or None when there is none.

    A damaged one (missing object, wrong size, wrong checksum) is skipped with a
    warning naming it.
    """
    for url in reversed(committed(run_url)):
        try:
            return url, _deserialize(_read_verified(url), url)
        except CheckpointError as error:
            log.warning("skipping damaged checkpoint: %s", error)
    return None


def load(url: str) -> tuple[str, dict[str, Any]]:
    """Load a checkpoint given as a file, a committed checkpoint prefix or a run URL."""
    if storage.exists(storage.join(url, COMMIT_FILE)):
        return url, _deserialize(_read_verified(url), url)
    if storage.exists(storage.join(url, "checkpoints")):
        found = load_latest(url)
        if found is None:
            raise CheckpointError(f"run {url} has no intact committed checkpoint")
        return found
    try:
        data = storage.read_bytes(url)
    except (FileNotFoundError, IsADirectoryError):
        raise CheckpointError(f"checkpoint {url} does not exist") from None
    return url, _deserialize(data, url)


def backbone_state_dict(state: dict[str, Any], url: str) -> dict[str, torch.Tensor]:
    """The query backbone's torchvision ResNet keys, without the `fc.*` head."""
    weights = state.get("state_dict", state)
    if not isinstance(weights, dict) or not weights:
        raise CheckpointError(f"{url} has no state_dict")
    for prefix in ("query_encoder.", "module.encoder_q.", "encoder_q.", ""):
        picked = {
            key[len(prefix) :]: value
            for key, value in weights.items()
            if key.startswith(prefix) and isinstance(value, torch.Tensor)
        }
        if prefix and picked or not prefix and "conv1.weight" in picked:
            return {key: value for key, value in picked.items() if not key.startswith("fc.")}
    first = next(iter(weights))
    raise CheckpointError(
        f"{url} is not a ResNet checkpoint: no query_encoder.*, module.encoder_q.* or conv1.weight "
        f"keys (first key: {first!r})"
    )


def write_final(run_url: str, checkpoint_url: str, summary: dict[str, Any]) -> None:
    storage.write_text(
        storage.join(run_url, FINAL_FILE), json.dumps({"checkpoint": checkpoint_url, **summary})
    )


def finished(run_url: str) -> bool:
    return storage.exists(storage.join(run_url, FINAL_FILE))


def read_final(run_url: str) -> dict[str, Any]:
    final = json.loads(storage.read_text(storage.join(run_url, FINAL_FILE)))
    return {**final, "checkpoint_url": final.get("checkpoint")}


def wait_for_final(run_url: str, timeout: float, poll: float = 5.0) -> None:
    """Block until `run_url` has finished (its final.json exists), at most `timeout` s."""
    deadline = time.monotonic() + timeout
    while not storage.exists(storage.join(run_url, FINAL_FILE)):
        if time.monotonic() > deadline:
            raise CheckpointError(
                f"pretrain run {run_url} has not finished after {timeout:.0f} s "
                f"(no {FINAL_FILE}); raise wait_for_pretrained or check that run"
            )
        log.info("waiting for pretrain run %s to finish", run_url)
        time.sleep(poll)


def export_backbone(source: str, out: str) -> int:
    """Write the query backbone of `source` (a checkpoint file, a committed
    checkpoint or a run URL) as a plain torchvision ResNet state dict without
    the head; returns the number of tensors written."""
    url, state = load(source)
    weights = backbone_state_dict(state, url)
    storage.write_bytes(out, serialize(weights))
    return len(weights)
