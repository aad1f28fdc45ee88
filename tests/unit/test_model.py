import torch
import torch.nn.functional as F

from jcl_k8s.model import JCL, build_resnet


def small_model(queue_size=10):
    return JCL("resnet18", "small", dim=8, mlp=True, queue_size=queue_size, key_momentum=0.9)


def test_queue_wraps_for_a_batch_that_does_not_divide_it():
    model = small_model(queue_size=10)
    batches = [F.normalize(torch.randn(4, 8), dim=1) for _ in range(3)]
    for keys in batches:
        model.enqueue(keys)
    # 12 keys into 10 slots: slots 0-1 hold keys 10-11 (the third batch's last two).
    assert int(model.queue_ptr) == 2
    torch.testing.assert_close(model.queue[:, 0:2].T, batches[2][2:4])
    torch.testing.assert_close(model.queue[:, 2:4].T, batches[0][2:4])
    torch.testing.assert_close(model.queue[:, 8:10].T, batches[2][0:2])


def test_batch_larger_than_queue_keeps_its_newest_keys():
    model = small_model(queue_size=4)
    keys = F.normalize(torch.randn(6, 8), dim=1)
    model.enqueue(keys)
    assert int(model.queue_ptr) == 0
    torch.testing.assert_close(model.queue.T, keys[2:])


def test_key_encoder_starts_equal_and_follows_by_momentum():
    model = small_model()
    q = dict(model.query_encoder.named_parameters())
    for name, p in model.key_encoder.named_parameters():
        assert torch.equal(p, q[name]) and not p.requires_grad
    before = model.key_encoder.conv1.weight.clone()
    with torch.no_grad():
        model.query_encoder.conv1.weight.add_(1.0)
    model.momentum_update()
    torch.testing.assert_close(model.key_encoder.conv1.weight, before + 0.1)


def test_forward_returns_loss_and_mean_keys_of_the_batch():
    model = small_model()
    crops = torch.randn(4, 3, 3, 16, 16)
    loss, mu = model(crops, tau=0.2, lambda_t=1.0, generator=torch.Generator().manual_seed(0))
    assert mu.shape == (4, 8)
    assert loss.logits.shape == (4, 11)
    assert torch.isfinite(loss.total) and loss.jcl.item() >= 0
    loss.total.backward()
    assert model.query_encoder.conv1.weight.grad is not None
    assert model.key_encoder.conv1.weight.grad is None


def test_small_stem_keeps_torchvision_keys():
    small = build_resnet("resnet18", "small", 10)
    reference = build_resnet("resnet18", "imagenet", 10)
    assert small.state_dict().keys() == reference.state_dict().keys()
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 10)
