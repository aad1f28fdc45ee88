"""What a checkpoint must hold to continue as if nothing happened, and how it is
restored: schedule position, data position, every rank's RNG states.

The data position is counted in global batches of the epoch's permutation
(see `data.sampler`), so it means the same at any world size. RNG states are
restored per rank when the world size is unchanged; after a change the ranks
are re-seeded from (seed, global step), which does not affect the data
(augmentations are seeded per sample) and is logged.
"""

import logging
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from jcl_k8s import checkpoint
from jcl_k8s.errors import CheckpointError, UserError

log = logging.getLogger(__name__)


@dataclass
class Position:
    """Where training stands: `step_in_epoch` global batches of `epoch` are done."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0


def rng_state() -> dict[str, Any]:
    """This process's RNG states, in types that `weights_only` loading accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "cached_gaussian": cached},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states(group) -> list[dict[str, Any]]:
    """Every rank's RNG states, in rank order (a collective)."""
    mine = rng_state()
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [mine]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, mine, group=group)
    return states


def find_resume_point(resume: str, run_url: str) -> tuple[str, dict[str, Any]] | None:
    """The checkpoint to continue from, per the `resume` setting."""
    if resume == "never":
        if checkpoint.committed(run_url):
            raise UserError(
                f"output_url {run_url} already holds committed checkpoints and resume=never; "
                "use a new output_url, or resume=auto to continue that run"
            )
        return None
    if resume == "auto":
        return checkpoint.load_latest(run_url)
    return checkpoint.load(resume)


def restore(
    state: dict[str, Any], url: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    global_batch: int, num_samples: int, rank: int, world_size: int, seed: int,
) -> Position:
    """Load `state` into the model and optimiser; returns the position to continue from."""
    try:
        data = state["data"]
        position = Position(**state["position"])
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
    except (KeyError, TypeError, RuntimeError, ValueError) as error:
        raise CheckpointError(f"{url} cannot be resumed from: {error}") from None
    if data["global_batch"] != global_batch:
        raise UserError(
            f"{url} was trained with batch_size {data['global_batch']}; resuming needs the same "
            f"global batch (got batch_size {global_batch})"
        )
    if data["num_samples"] != num_samples:
        raise UserError(
            f"{url} was trained on {data['num_samples']} images, data.url now lists {num_samples}"
        )

    saved_world = data["world_size"]
    if saved_world == world_size:
        set_rng_state(state["rng"][rank])
    else:
        torch.manual_seed(seed * 100_003 + position.global_step * world_size + rank)
        log.warning(
            "world size changed from %d to %d on resume: the global batch (%d), lr, queue and "
            "sample order stay; each process now takes %d images per step; RNG states re-seeded",
            saved_world, world_size, global_batch, global_batch // world_size,
        )
    log.info("resumed from %s at epoch %d, step %d of the epoch (global step %d)", url,
             position.epoch + 1, position.step_in_epoch, position.global_step)
    return position
