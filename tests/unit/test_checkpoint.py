import io
import os
import pickle

import pytest
import torch
from omegaconf import OmegaConf

from jcl_k8s import checkpoint
from jcl_k8s.config import load_config
from jcl_k8s.errors import CheckpointError
from jcl_k8s.lincls import load_backbone
from jcl_k8s.model import JCL


def lincls_config(pretrained: str, arch: str = "resnet18"):
    return load_config("lincls", "small", overrides=[
        "data.url=/unused", "output_url=/unused", f"pretrained={pretrained}",
        f"model.arch={arch}",
    ])


def published_moco_checkpoint(path, model: JCL) -> None:
    """A file laid out like the MoCo / JCL releases (DDP prefix, epoch/arch/optimizer)."""
    state_dict = {}
    for key, value in model.query_encoder.state_dict().items():
        state_dict[f"module.encoder_q.{key}"] = value
    for key, value in model.key_encoder.state_dict().items():
        state_dict[f"module.encoder_k.{key}"] = value
    state_dict["module.queue"] = model.queue
    state_dict["module.queue_ptr"] = model.queue_ptr
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": state_dict, "optimizer": {}}, path)


def test_lincls_loads_the_published_moco_format(tmp_path):
    model = JCL("resnet18", "imagenet", dim=128, queue_size=16)
    path = tmp_path / "moco_v2_200ep_pretrain.pth.tar"
    published_moco_checkpoint(path, model)
    net = load_backbone(lincls_config(str(path)), num_classes=10)
    torch.testing.assert_close(net.conv1.weight, model.query_encoder.conv1.weight)
    torch.testing.assert_close(net.layer4[1].bn2.running_var,
                               model.query_encoder.layer4[1].bn2.running_var)
    assert net.fc.weight.shape == (10, 512) and torch.all(net.fc.bias == 0)
    assert [n for n, p in net.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]


def test_lincls_loads_this_projects_committed_checkpoint(tmp_path):
    model = JCL("resnet18", "imagenet", dim=128, queue_size=16)
    url = checkpoint.save(str(tmp_path / "run"), 12, {"epoch": 1, "state_dict": model.state_dict()})
    assert url.endswith("checkpoints/step-000000012")
    for pretrained in (url, str(tmp_path / "run")):
        net = load_backbone(lincls_config(pretrained), num_classes=10)
        torch.testing.assert_close(net.layer1[0].conv1.weight,
                                   model.query_encoder.layer1[0].conv1.weight)


def test_mismatched_backbone_names_first_missing_and_unexpected_keys(tmp_path):
    model = JCL("resnet18", "imagenet", dim=128, queue_size=16)
    path = tmp_path / "r18.pth"
    published_moco_checkpoint(path, model)
    with pytest.raises(CheckpointError, match="model.arch=resnet50.*the checkpoint's arch is "
                       "resnet18.*first missing key 'layer1.0.bn3.bias'$"):
        load_backbone(lincls_config(str(path), arch="resnet50"), num_classes=10)


@pytest.mark.parametrize("content", [b"this is not a checkpoint", pickle.dumps([1, 2, 3])])
def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path, content):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=str(path)):
        load_backbone(lincls_config(str(path)), num_classes=10)


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_backbone(lincls_config(str(tmp_path / "nope.pth")), num_classes=10)


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_loading_refuses_a_pickle_that_would_run_code(tmp_path):
    buffer = io.BytesIO()
    torch.save({"state_dict": {}, "payload": RunsCode()}, buffer)
    path = tmp_path / "evil.pth"
    path.write_bytes(buffer.getvalue())
    with pytest.raises(CheckpointError, match="not a checkpoint this tool can load"):
        checkpoint.load(str(path))


def test_config_in_checkpoint_survives_weights_only(tmp_path):
    config = OmegaConf.to_container(load_config("pretrain", "small", overrides=[
        "data.url=/d", "output_url=/o"]))
    url = checkpoint.save(str(tmp_path), 1, {"config": config, "epoch": 1})
    _, state = checkpoint.load(url)
    assert state["config"]["model"]["arch"] == "resnet18"
