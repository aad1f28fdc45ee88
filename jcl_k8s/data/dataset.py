"""Images of one split at an fsspec URL, decoded and augmented per sample.

Each DataLoader worker opens its own filesystem (s3fs clients are not
fork-safe). A sample that cannot be decoded is replaced by the next one in the
split, and its path travels back in the batch so that the main process can
count it and warn once per file: counts made in workers are never lost.
"""

import logging
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import Dataset

from jcl_k8s import storage
from jcl_k8s.data.index import SplitIndex

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_BAD = 16
FETCH_CHUNK = 256


class ImageSplit(Dataset):
    """Map-style dataset over `ROOT/<split>/`; items are keyed (epoch, sample id)."""

    def __init__(
        self,
        root: str,
        split: str,
        index: SplitIndex,
        transform: Callable[[Image.Image], torch.Tensor],
        seed: int = 0,
        cache: list[bytes | None] | None = None,
    ):
        self.split_url = storage.join(root, split)
        self.index = index
        self.transform = transform
        self.seed = seed
        self.cache = cache
        self._fs = None
        self._fs_pid = -1

    def __len__(self) -> int:
        return len(self.index.samples)

    @property
    def classes(self) -> list[str]:
        return self.index.classes

    def _filesystem(self):
        if self._fs is None or self._fs_pid != os.getpid():
            self._fs, self._base = storage.url_to_fs(self.split_url, fresh=True)
            self._fs_pid = os.getpid()
        return self._fs

    def _read(self, i: int) -> bytes | None:
        if self.cache is not None:
            return self.cache[i]
        fs = self._filesystem()
        path = f"{self._base.rstrip('/')}/{self.index.samples[i][0]}"
        try:
            with storage.explained(self.split_url, "reading"):
                return fs.cat_file(path)
        except FileNotFoundError:
            return None

    def _decode(self, i: int) -> Image.Image | None:
        data = self._read(i)
        if data is None:
            return None
        try:
            image = Image.open(storage.as_file(data))
            image.load()
            return image.convert("RGB")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            return None

    def __getitem__(self, key: tuple[int, int] | int) -> tuple[torch.Tensor, int, int, str]:
        epoch, i = key if isinstance(key, tuple) else (0, key)
        skipped = []
        for attempt in range(MAX_CONSECUTIVE_BAD):
            j = (i + attempt) % len(self)
            image = self._decode(j)
            if image is not None:
                break
            skipped.append(f"{self.split_url}/{self.index.samples[j][0]}")
        else:
            raise RuntimeError(f"{MAX_CONSECUTIVE_BAD} consecutive unreadable images from "
                               f"{skipped[0]}; is {self.split_url} damaged?")

        # The views depend only on (seed, epoch, sample id), not on the worker.
        sample_seed = np.random.SeedSequence([self.seed, epoch, i]).generate_state(2)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(sample_seed[0]) << 32 | int(sample_seed[1]))
            tensor = self.transform(image)
        return tensor, self.index.samples[j][1], i, "\n".join(skipped)


class SkipCounter:
    """Counts the unreadable images reported in batches; warns once per file."""

    def __init__(self):
        self.count = 0
        self._warned: set[str] = set()

    def update(self, skipped: list[str]) -> int:
        new = 0
        for entry in skipped:
            for path in filter(None, entry.split("\n")):
                new += 1
                if path not in self._warned:
                    self._warned.add(path)
                    log.warning("skipped unreadable image %s", path)
        self.count += new
        return new


def fetch_all(root: str, split: str, index: SplitIndex) -> list[bytes | None]:
    """Every encoded image of the split, read once (used with data.cache_bytes).

    Under torch.distributed each rank reads a strided share and the shares are
    exchanged, so the endpoint serves every object once per job, not per rank.
    """
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    split_url = storage.join(root, split)
    fs, base = storage.url_to_fs(split_url)
    mine = list(range(rank, len(index.samples), world))
    share: dict[int, bytes | None] = {}
    for start in range(0, len(mine), FETCH_CHUNK):
        ids = mine[start : start + FETCH_CHUNK]
        paths = [f"{base.rstrip('/')}/{index.samples[i][0]}" for i in ids]
        with storage.explained(split_url, "reading"):
            found = fs.cat(paths, on_error="return")
        for i, path in zip(ids, paths, strict=True):
            value = found.get(path)
            if isinstance(value, FileNotFoundError) or value is None:
                share[i] = None
            elif isinstance(value, BaseException):
                with storage.explained(split_url, "reading"):
                    raise value
            else:
                share[i] = value

    shares: list[Any] = [share]
    if world > 1:
        shares = [None] * world
        dist.all_gather_object(shares, share)
    cache: list[bytes | None] = [None] * len(index.samples)
    for part in shares:
        for i, value in part.items():
            cache[i] = value
    return cache
