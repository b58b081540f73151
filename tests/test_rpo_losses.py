"""RPO distances: hand-computed values (K = 2 and K = 4), group = pair at K = 2, saturation, DPO limit."""

from __future__ import annotations

import math

import pytest
import torch

from rpo_pipeline.losses import dpo_sigmoid, rpo_group, rpo_pair


def _sig(x):
    return 1 / (1 + math.exp(-x))


def test_pair_distances_hand_computed():
    a, b = torch.tensor([0.5], dtype=torch.float64), torch.tensor([2.0], dtype=torch.float64)
    sa, sb = _sig(0.5), _sig(2.0)  # 0.622459, 0.880797
    bwd = sb * math.log(sb / sa) + (1 - sb) * math.log((1 - sb) / (1 - sa))
    fwd = sa * math.log(sa / sb) + (1 - sa) * math.log((1 - sa) / (1 - sb))
    assert rpo_pair(a, b, "bwd_kl").item() == pytest.approx(bwd, abs=1e-12)
    assert rpo_pair(a, b, "fwd_kl").item() == pytest.approx(fwd, abs=1e-12)
    # by hand, 6-digit logarithms
    assert bwd == pytest.approx(0.305768 - 0.137431, abs=1e-4) and fwd == pytest.approx(-0.216088 + 0.435275, abs=1e-4)
    assert rpo_pair(a, b, "sq").item() == 2.25


def test_group_distances_hand_computed_k4():
    a = torch.tensor([[1.0, 0.0, -1.0, 0.5]], dtype=torch.float64)
    b = torch.tensor([[2.0, -1.0, 0.0, 0.0]], dtype=torch.float64)
    qa = [math.exp(x) for x in a[0].tolist()]
    qa = [x / sum(qa) for x in qa]
    qb = [math.exp(x) for x in b[0].tolist()]
    qb = [x / sum(qb) for x in qb]
    bwd = sum(p * math.log(p / q) for p, q in zip(qb, qa, strict=True))
    fwd = sum(q * math.log(q / p) for p, q in zip(qb, qa, strict=True))
    assert rpo_group(a, b, "bwd_kl").item() == pytest.approx(bwd, abs=1e-12)
    assert rpo_group(a, b, "fwd_kl").item() == pytest.approx(fwd, abs=1e-12)
    # sqloo: â_k = a_k − mean of the other three
    av, bv = a[0].tolist(), b[0].tolist()
    a_hat = [x - (sum(av) - x) / 3 for x in av]
    b_hat = [x - (sum(bv) - x) / 3 for x in bv]
    sq = 0.5 * sum((x - y) ** 2 for x, y in zip(a_hat, b_hat, strict=True))
    assert rpo_group(a, b, "sq").item() == pytest.approx(sq, abs=1e-12)
    # by hand: â = (4a − Σa)/3 = [7/6, −1/6, −3/2, 1/2], b̂ = (4b − Σb)/3 = [7/3, −5/3, −1/3, −1/3]
    assert sq == pytest.approx(0.5 * (49 / 36 + 9 / 4 + 49 / 36 + 25 / 36), abs=1e-12)  # = 17/6


@pytest.mark.parametrize("distance", ["bwd_kl", "fwd_kl", "sq"])
def test_group_equals_pair_at_k2(distance):
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(32, 2, generator=g, dtype=torch.float64) * 3 for _ in range(2))
    pair = rpo_pair(a[:, 0] - a[:, 1], b[:, 0] - b[:, 1], distance)
    torch.testing.assert_close(rpo_group(a, b, distance), pair)


@pytest.mark.parametrize("distance", ["bwd_kl", "fwd_kl"])
def test_gradients_finite_when_sigmoid_saturates(distance):
    a = torch.tensor([80.0, -80.0, 300.0, -300.0, 40.0], dtype=torch.float32, requires_grad=True)
    b = torch.tensor([-90.0, 90.0, 300.0, 250.0, -400.0], dtype=torch.float32)
    loss = rpo_pair(a, b, distance).sum()
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(a.grad).all()
    ag = torch.tensor([[80.0, -80.0, 0.0, 300.0]], requires_grad=True)
    rpo_group(ag, torch.tensor([[-300.0, 200.0, 0.0, 1.0]]), distance).sum().backward()
    assert torch.isfinite(ag.grad).all()


def test_bwd_kl_tends_to_dpo_as_target_margin_grows():
    """As η·Δr → ∞, σ(b) → 1 and bwd_kl → −log σ(a): DPO's loss (the paper's special case)."""
    a = torch.tensor([-2.0, -0.5, 0.0, 0.7, 3.0], dtype=torch.float64)
    dpo = dpo_sigmoid(a, beta=1.0)  # −log σ(βΔ) with βΔ = a
    gaps = [(rpo_pair(a, torch.full_like(a, b), "bwd_kl") - dpo).abs().max().item()
            for b in (5.0, 10.0, 20.0, 40.0)]
    assert gaps[-1] < 1e-12 and all(x > y for x, y in zip(gaps, gaps[1:], strict=False))  # monotone


def test_unknown_distance():
    with pytest.raises(ValueError, match="unknown RPO distance 'js'"):
        rpo_pair(torch.zeros(1), torch.zeros(1), "js")
