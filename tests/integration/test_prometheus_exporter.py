"""Counts made in DataLoader worker processes reach the exporter of the main process."""

import urllib.request

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from torch.utils.data import DataLoader, Dataset

from jcl_k8s.metrics import TrainingMetrics
from tests.conftest import free_port

pytestmark = pytest.mark.integration

IMAGES, UNREADABLE_EVERY = 96, 7


class FlakyImages(Dataset):
    """Every 7th image is unreadable; each item says how many it skipped, as ImageSplit does."""

    def __init__(self, metrics: TrainingMetrics | None = None) -> None:
        self.metrics = metrics

    def __len__(self) -> int:
        return IMAGES

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        skipped = int(index % UNREADABLE_EVERY == 0)
        if self.metrics is not None:  # the wrong way: counted in the worker's copy
            self.metrics.count_skipped_images(skipped)
        return torch.zeros(3), skipped


def scraped_skips(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return next(sample.value for family in text_string_to_metric_families(text)
                for sample in family.samples if sample.name == "jcl_skipped_images_total")


def loader(dataset: Dataset) -> DataLoader:
    return DataLoader(dataset, batch_size=8, num_workers=2, multiprocessing_context="fork")


@pytest.fixture
def metrics(monkeypatch):
    monkeypatch.setenv("JCL_METRICS_ADDR", "127.0.0.1")
    m = TrainingMetrics("pretrain", "workers", 0, 0, free_port())
    yield m
    m.close()


def test_counts_returned_in_batches_are_all_counted(metrics):
    expected = sum(1 for i in range(IMAGES) if i % UNREADABLE_EVERY == 0)
    for _images, skipped in loader(FlakyImages()):
        metrics.count_skipped_images(int(skipped.sum()))
    assert scraped_skips(metrics.port) == expected


def test_counting_inside_the_workers_would_lose_them(metrics):
    for _ in loader(FlakyImages(metrics)):
        pass
    assert scraped_skips(metrics.port) == 0  # why the workers hand their counts back instead
