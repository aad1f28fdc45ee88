import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jcl_k8s.loss import jcl_loss, mean_keys
from tests.conftest import shared_path


def _cases():
    data = np.load(shared_path("testdata", "jcl_loss_cases.npz"))
    names = sorted({key.split("_", 1)[0] for key in data.files})
    return data, names


def test_loss_matches_every_reference_case():
    data, names = _cases()
    assert len(names) >= 4
    for name in names:
        case = {key.split("_", 1)[1]: torch.from_numpy(data[key]) for key in data.files
                if key.startswith(name + "_")}
        q = F.normalize(case["q_raw"], dim=1)
        k = F.normalize(case["k_raw"], dim=2)
        out = jcl_loss(q, k, case["queue"], float(case["tau"]), float(case["lambda_t"]))
        assert out.logits.dtype == torch.float64
        torch.testing.assert_close(out.logits, case["logits"], rtol=0, atol=1e-9)
        assert abs(out.ce.item() - case["ce_loss"].item()) < 1e-9, name
        assert abs(out.jcl.item() - case["jcl_term"].item()) < 1e-9, name
        assert abs(out.total.item() - case["total_loss"].item()) < 1e-9, name
        torch.testing.assert_close(mean_keys(k), case["enqueued_keys"], rtol=0, atol=1e-9)


def moco_v2_loss(q, k, queue, tau):
    """MoCo v2's InfoNCE, written the way the MoCo paper states it."""
    l_pos = (q * k).sum(1, keepdim=True)
    l_neg = q @ queue
    logits = torch.cat([l_pos, l_neg], 1) / tau
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long))


def test_one_key_per_query_is_moco_v2():
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(16, 32, generator=g, dtype=torch.float64), dim=1)
    k = F.normalize(torch.randn(1, 16, 32, generator=g, dtype=torch.float64), dim=2)
    queue = F.normalize(torch.randn(32, 100, generator=g, dtype=torch.float64), dim=0)
    out = jcl_loss(q, k, queue, tau=0.2, lambda_t=2.0)
    assert out.jcl.item() == 0.0
    assert abs(out.total.item() - moco_v2_loss(q, k[0], queue, 0.2).item()) < 1e-12


def test_jcl_term_is_positive_with_spread_keys():
    g = torch.Generator().manual_seed(1)
    q = F.normalize(torch.randn(8, 16, generator=g, dtype=torch.float64), dim=1)
    k = F.normalize(torch.randn(4, 8, 16, generator=g, dtype=torch.float64), dim=2)
    queue = F.normalize(torch.randn(16, 10, generator=g, dtype=torch.float64), dim=0)
    assert jcl_loss(q, k, queue, 0.2, 1.0).jcl.item() > 0
    assert jcl_loss(q, k, queue, 0.2, 0.0).jcl.item() == 0


def test_bad_shapes_are_refused():
    q = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="M x N x C"):
        jcl_loss(q, torch.zeros(4, 8), torch.zeros(8, 3), 0.2, 1.0)
