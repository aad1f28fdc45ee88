import json
import logging

import torch
import torchvision

from jcl_k8s import checkpoint
from jcl_k8s.data.sampler import GlobalBatchSampler
from jcl_k8s.model import JCL
from jcl_k8s.resume import rng_state, set_rng_state


def state(value: float) -> dict:
    return {"epoch": 1, "state_dict": {"w": torch.full((64,), value)}}


def test_latest_skips_damaged_checkpoints_with_a_warning(tmp_path, caplog):
    run = str(tmp_path / "run")
    for step in (10, 20, 30, 40):
        checkpoint.save(run, step, state(step))
    (tmp_path / "run/checkpoints/step-000000040/state.pt").write_bytes(b"truncated")
    data = bytearray((tmp_path / "run/checkpoints/step-000000030/state.pt").read_bytes())
    data[-20] ^= 0xFF
    (tmp_path / "run/checkpoints/step-000000030/state.pt").write_bytes(bytes(data))
    (tmp_path / "run/checkpoints/step-000000020/state.pt").unlink()

    with caplog.at_level(logging.WARNING):
        url, loaded = checkpoint.load_latest(run)
    assert url.endswith("step-000000010") and loaded["state_dict"]["w"][0] == 10
    text = caplog.text
    assert "step-000000040/state.pt has 9 bytes" in text
    assert "step-000000030/state.pt does not match its checksum" in text
    assert "step-000000020 is committed but has no state.pt" in text


def test_uncommitted_prefix_is_ignored(tmp_path):
    run = str(tmp_path / "run")
    checkpoint.save(run, 5, state(5))
    partial = tmp_path / "run/checkpoints/step-000000009"
    partial.mkdir()
    (partial / "state.pt").write_bytes(checkpoint.serialize(state(9)))
    assert [u.rsplit("/", 1)[1] for u in checkpoint.committed(run)] == ["step-000000005"]
    assert checkpoint.load_latest(run)[0].endswith("step-000000005")


def test_prune_keeps_the_newest_and_every_nth_epoch_and_drops_leftovers(tmp_path):
    run = str(tmp_path / "run")
    for epoch in range(1, 7):
        checkpoint.save(run, epoch * 10, {"epoch": epoch}, epoch_end=True)
    (tmp_path / "run/checkpoints/step-000000015").mkdir()  # a killed upload
    deleted = checkpoint.prune(run, keep_last=2, keep_every_epochs=3)
    left = sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir())
    assert left == ["step-000000030", "step-000000050", "step-000000060"]
    assert len(deleted) == 4


def test_background_writer_commits_one_upload_at_a_time(tmp_path):
    run = str(tmp_path / "run")
    saved = []
    writer = checkpoint.BackgroundWriter(run, keep_last=2,
                                         on_saved=lambda s, n: saved.append(n))
    live = {"w": torch.zeros(1000)}
    for step in (1, 2, 3):
        writer.save(step, {"epoch": 0, "state_dict": live})
        live["w"] += 1  # training goes on; the snapshot must not change
    writer.wait()
    assert len(saved) == 3
    assert [u.rsplit("/", 1)[1] for u in checkpoint.committed(run)] == [
        "step-000000002", "step-000000003"]
    _, last = checkpoint.load_latest(run)
    assert torch.all(last["state_dict"]["w"] == 2)
    marker = json.loads((tmp_path / "run/checkpoints/step-000000003/COMMIT").read_text())
    assert marker["global_step"] == 3 and marker["bytes"] > 4000


def resume_ids(num_samples, batch, seed, epoch, before_world, after_world, stop_step):
    """Sample ids an epoch sees when `before_world` ranks stop after `stop_step` global
    batches and `after_world` ranks finish it."""
    seen = []
    for world, steps in ((before_world, range(0, stop_step)), (after_world, None)):
        for rank in range(world):
            sampler = GlobalBatchSampler(num_samples, batch, rank, world, seed)
            sampler.set_epoch(epoch, 0 if steps is not None else stop_step)
            for step, part in enumerate(sampler):
                if steps is None or step in steps:
                    seen.extend(i for _epoch, i in part)
    return seen


def test_every_sample_once_when_the_world_size_changes_mid_epoch():
    for before, after in ((2, 1), (1, 2), (4, 2), (2, 4)):
        seen = resume_ids(1000, 32, seed=3, epoch=2, before_world=before, after_world=after,
                          stop_step=13)
        assert len(seen) == len(set(seen)) == 31 * 32, (before, after)
        uninterrupted = resume_ids(1000, 32, 3, 2, before, before, stop_step=0)
        assert sorted(seen) == sorted(uninterrupted)


def test_rng_states_round_trip_through_weights_only(tmp_path):
    import random

    import numpy as np

    saved = rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    url = checkpoint.save(str(tmp_path), 1, {"rng": [saved]})
    _, loaded = checkpoint.load(url)
    set_rng_state(loaded["rng"][0])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]


def test_export_loads_into_torchvision_with_only_fc_missing(tmp_path):
    model = JCL("resnet50", "imagenet", dim=128, queue_size=8)
    run = str(tmp_path / "run")
    checkpoint.save(run, 7, {"epoch": 1, "state_dict": model.state_dict()})
    out = tmp_path / "resnet50-backbone.pth"
    assert checkpoint.export_backbone(run, str(out)) > 300
    resnet = torchvision.models.resnet50()
    result = resnet.load_state_dict(torch.load(out, weights_only=True), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    assert result.unexpected_keys == []
    torch.testing.assert_close(resnet.layer3[2].conv2.weight,
                               model.query_encoder.layer3[2].conv2.weight)
