import pytest

from jcl_k8s.data.sampler import GlobalBatchSampler
from jcl_k8s.errors import UserError


def epoch_batches(num_samples, batch, world, epoch=0, start_step=0, seed=0):
    """The global batches of an epoch, assembled from every rank's share."""
    per_rank = []
    for rank in range(world):
        sampler = GlobalBatchSampler(num_samples, batch, rank, world, seed)
        sampler.set_epoch(epoch, start_step)
        per_rank.append(list(sampler))
    return [sum(parts, []) for parts in zip(*per_rank, strict=True)]


def test_global_batches_do_not_depend_on_world_size():
    one = epoch_batches(103, 12, world=1)
    assert epoch_batches(103, 12, world=2) == one
    assert epoch_batches(103, 12, world=4) == one
    ids = [i for batch in one for _epoch, i in batch]
    assert len(ids) == len(set(ids)) == 96  # 8 full global batches; the tail is dropped


def test_epochs_are_different_permutations():
    first = [i for b in epoch_batches(50, 10, 1, epoch=0) for _, i in b]
    second = [i for b in epoch_batches(50, 10, 1, epoch=1) for _, i in b]
    assert sorted(first) == sorted(second) and first != second


def test_start_step_skips_whole_global_batches():
    full = epoch_batches(64, 8, 2)
    assert epoch_batches(64, 8, 2, start_step=3) == full[3:]


def test_batch_that_does_not_split_over_ranks_is_refused():
    with pytest.raises(UserError, match="batch_size 10 does not divide over 4"):
        GlobalBatchSampler(100, 10, 0, 4)
    with pytest.raises(UserError, match="larger than the 5 training images"):
        GlobalBatchSampler(5, 8, 0, 1)
