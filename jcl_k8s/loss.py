"""The JCL loss (and MoCo v2's, its M = 1 case) as one plain function.

Notation follows the paper: `q` are the query embeddings, `k` the M positive key
embeddings of every query, `queue` the negative keys. The covariance term
`q^T Sigma q` is computed as the mean squared projection of the centred keys on
`q`, so no per-sample `dim x dim` matrix is ever built.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F


class JCLLoss(NamedTuple):
    """The parts of one JCL loss evaluation."""

    logits: torch.Tensor
    """N x (1 + K) logits, already divided by tau; column 0 is the positive."""
    ce: torch.Tensor
    """Batch mean of the cross-entropy against the positive column."""
    jcl: torch.Tensor
    """Batch mean of the JCL term `lambda_t * q^T Sigma q / (2 tau^2)`."""
    total: torch.Tensor
    """`ce + jcl`: the quantity to minimise."""


def mean_keys(k: torch.Tensor) -> torch.Tensor:
    """The mean of the M positive keys of each query (N x C, not re-normalised).

    These are what the queue stores.
    """
    return k.mean(dim=0)


def jcl_loss(
    q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, tau: float, lambda_t: float
) -> JCLLoss:
    """JCL loss for L2-normalised queries `q` (N x C), keys `k` (M x N x C,
    crop-major: the M keys of query n are `k[:, n]`) and negatives `queue` (C x K).

    With M = 1 the covariance vanishes and this is exactly MoCo v2's InfoNCE.
    """
    if k.dim() != 3 or k.shape[1:] != q.shape:
        raise ValueError(f"k must be M x N x C with N x C = {tuple(q.shape)}, got {tuple(k.shape)}")
    if queue.shape[0] != q.shape[1]:
        raise ValueError(f"queue must be C x K with C = {q.shape[1]}, got {tuple(queue.shape)}")

    mu = mean_keys(k)

    # q^T Sigma q with the biased covariance of the M keys, without building Sigma.
    projections = torch.einsum("nc,mnc->mn", q, k - mu)
    spread = projections.pow(2).mean(dim=0)

    l_pos = (torch.einsum("nc,nc->n", q, mu) + lambda_t * spread / (2 * tau)) / tau
    l_neg = q @ queue / tau
    logits = torch.cat([l_pos.unsqueeze(1), l_neg], dim=1)

    target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    ce = F.cross_entropy(logits, target)
    jcl = (lambda_t * spread / (2 * tau**2)).mean()
    return JCLLoss(logits=logits, ce=ce, jcl=jcl, total=ce + jcl)
