"""The global-batch sampler: every epoch is one permutation cut into global batches.

Step s of epoch e trains on positions [s*B, (s+1)*B) of the permutation of
(seed, e), B the global batch; rank r of W takes the r-th of W equal slices.
The global batches do not depend on the world size, so a run resumed at step s
with another world size sees exactly the samples an uninterrupted run would
still see, none repeated and none skipped. The tail of fewer than B samples is
dropped each epoch (a different tail every epoch).
"""

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from jcl_k8s.errors import UserError


class GlobalBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields this rank's part of each global batch as (epoch, sample id) pairs."""

    def __init__(self, num_samples: int, global_batch: int, rank: int, world_size: int,
                 seed: int = 0):
        if global_batch % world_size:
            raise UserError(
                f"batch_size {global_batch} does not divide over {world_size} processes; "
                f"use a multiple of {world_size}"
            )
        if num_samples < global_batch:
            raise UserError(
                f"batch_size {global_batch} is larger than the {num_samples} training images"
            )
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.epoch = 0
        self.start_step = 0

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    @property
    def local_batch(self) -> int:
        return self.global_batch // self.world_size

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch, skipping its first `start_step` global batches."""
        self.epoch = epoch
        self.start_step = start_step

    def permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=generator)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = self.permutation(self.epoch).tolist()
        first = self.rank * self.local_batch
        for step in range(self.start_step, self.steps_per_epoch):
            batch = order[step * self.global_batch : (step + 1) * self.global_batch]
            yield [(self.epoch, i) for i in batch[first : first + self.local_batch]]

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_step
