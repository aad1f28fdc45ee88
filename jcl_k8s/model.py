"""ResNet backbones, the JCL / MoCo v2 model and its shuffle-BN key path.

The model owns the query encoder, the momentum key encoder, the projection
heads and the FIFO queue of mean keys. It does not own the optimiser or the
schedule (see `pretrain`). Under DDP the whole model is wrapped, as in MoCo, so
the key encoder's BatchNorm statistics and the queue stay identical on every
rank.
"""

import logging

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch import nn

from jcl_k8s.errors import UserError
from jcl_k8s.loss import JCLLoss, jcl_loss, mean_keys

log = logging.getLogger(__name__)

RESNETS = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "wide_resnet50_2", "wide_resnet101_2",
)


def build_resnet(arch: str, stem: str = "imagenet", num_classes: int = 1000) -> nn.Module:
    """A randomly initialised torchvision ResNet, optionally with a small-image stem.

    The 'small' stem (3x3 stride-1 conv, no max-pool) keeps the key names of the
    torchvision model, so checkpoints stay loadable into `torchvision.models.<arch>`
    built with the same stem.
    """
    if arch not in RESNETS:
        raise UserError(f"model.arch {arch!r} is not a torchvision ResNet; use one of {RESNETS}")
    net = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    if stem == "small":
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    return net


def build_encoder(arch: str, stem: str, dim: int, mlp: bool) -> nn.Module:
    """A ResNet whose `fc` is the projection head (MoCo v2: Linear-ReLU-Linear)."""
    net = build_resnet(arch, stem, num_classes=dim)
    if mlp:
        width = net.fc.weight.shape[1]
        net.fc = nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), net.fc)
    return net


class JCL(nn.Module):
    """Query encoder, momentum key encoder and queue; `forward` returns the loss."""

    def __init__(
        self,
        arch: str = "resnet50",
        stem: str = "imagenet",
        dim: int = 128,
        mlp: bool = True,
        queue_size: int = 65536,
        key_momentum: float = 0.999,
        shuffle_bn_groups: int = 2,
    ):
        super().__init__()
        self.key_momentum = key_momentum
        self.shuffle_bn_groups = shuffle_bn_groups
        self.query_encoder = build_encoder(arch, stem, dim, mlp)
        self.key_encoder = build_encoder(arch, stem, dim, mlp)
        self.key_encoder.load_state_dict(self.query_encoder.state_dict())
        for p in self.key_encoder.parameters():
            p.requires_grad = False

        self.register_buffer("queue", F.normalize(torch.randn(dim, queue_size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def momentum_update(self) -> None:
        """key_encoder <- m * key_encoder + (1 - m) * query_encoder."""
        m = self.key_momentum
        q_params = list(self.query_encoder.parameters())
        k_params = list(self.key_encoder.parameters())
        torch._foreach_mul_(k_params, m)
        torch._foreach_add_(k_params, q_params, alpha=1 - m)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write the global batch's mean keys (B x C) over the oldest entries.

        The ring wraps, so any batch size works; a batch larger than the queue
        keeps only its last `queue_size` keys.
        """
        size = self.queue.shape[1]
        keys = keys[-size:]
        ptr = int(self.queue_ptr)
        slots = (ptr + torch.arange(keys.shape[0], device=keys.device)) % size
        self.queue[:, slots] = keys.T.to(self.queue.dtype)
        self.queue_ptr[0] = (ptr + keys.shape[0]) % size

    @torch.no_grad()
    def _keys(self, crops: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Key embeddings of `crops` ((M*n) x 3 x H x W) with shuffle-BN.

        Across ranks the crops of the whole world are permuted before the key
        encoder sees them (MoCo's shuffle-BN); on a single process they are
        permuted and split into `shuffle_bn_groups` BatchNorm groups instead.
        """
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        local = crops.shape[0]
        everything = _gather(crops) if world > 1 else crops
        order = torch.randperm(everything.shape[0], generator=generator).to(crops.device)
        inverse = torch.argsort(order)

        if world > 1:
            rank = dist.get_rank()
            mine = order[rank * local : (rank + 1) * local]
            keys = F.normalize(self.key_encoder(everything[mine]), dim=1)
            keys = _gather(keys)[inverse]
            return keys[rank * local : (rank + 1) * local]

        groups = everything[order].chunk(max(1, self.shuffle_bn_groups))
        keys = torch.cat([F.normalize(self.key_encoder(g), dim=1) for g in groups])
        return keys[inverse]

    def forward(
        self, crops: torch.Tensor, tau: float, lambda_t: float, generator: torch.Generator
    ) -> tuple[JCLLoss, torch.Tensor]:
        """Loss for `crops` (n x k_crops x 3 x H x W) and the batch's mean keys.

        Crop 0 of each image is the query view, crops 1..M its positive keys.
        Returns the loss parts and the mean keys of the *global* batch, which
        the caller enqueues after the optimiser step.
        """
        n, k_crops = crops.shape[:2]
        q = F.normalize(self.query_encoder(crops[:, 0]), dim=1)

        key_views = crops[:, 1:].transpose(0, 1).reshape(-1, *crops.shape[2:])
        k = self._keys(key_views, generator).view(k_crops - 1, n, -1)

        loss = jcl_loss(q, k, self.queue.clone().detach(), tau, lambda_t)
        mu = mean_keys(k)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            mu = _gather(mu)
        return loss, mu


@torch.no_grad()
def _gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equally shaped tensors of every rank along dim 0 (no gradient)."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)
