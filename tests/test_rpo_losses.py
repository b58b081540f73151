"""RPO distances: hand-computed values (K = 2 and K = 4), group = pair at K = 2, saturation, DPO limit."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TableLM

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


def _groups_and_scores():
    import pandas as pd

    groups = pd.DataFrame({"group_id": ["g1", "g2"], "split": ["train", "val"],
                           "scores": [[1.0, 3.0, 2.0], [0.0, 4.0, 2.0]]})
    scores = pd.DataFrame({"group_id": ["g1"] * 3 + ["g2"] * 3, "response_index": [0, 1, 2] * 2,
                           "split": ["train"] * 3 + ["val"] * 3, "reward": [2.0, 4.0, 6.0, 1.0, 1.0, 4.0]})
    return groups, scores


def test_reward_targets_sources_and_normalizations():
    from rpo_pipeline.policy import reward_targets

    groups, scores = _groups_and_scores()
    z = reward_targets(groups, scores, {"mean": 4.0, "std": 2.0}, "reward_model", "zscore")
    assert z["target"].tolist() == [-1.0, 0.0, 1.0, -1.5, -1.5, 0.0]
    pp = reward_targets(groups, scores, None, "reward_model", "per_prompt")
    assert pp["target"].tolist() == [-2.0, 0.0, 2.0, -1.0, -1.0, 2.0]
    ds = reward_targets(groups, None, None, "dataset", "zscore")  # train mean 2, std sqrt(2/3)
    assert ds["target"].tolist()[:3] == pytest.approx([-1.224745, 1.224745, 0.0], abs=1e-6)
    assert reward_targets(groups, None, None, "dataset", "none")["target"].tolist() == [1, 3, 2, 0, 4, 2]
    with pytest.raises(ValueError, match="reward_source"):
        reward_targets(groups, scores, None, "judge", "none")


def test_group_items_need_equal_k_and_cached_reference():
    import pandas as pd

    from rpo_pipeline.policy import group_items

    tok = pd.DataFrame({"group_id": ["a", "a", "b", "b", "b"], "response_index": [0, 1, 0, 1, 2],
                        "split": ["train"] * 5, "input_ids": [[1, 2, 3]] * 5, "response_start": [1] * 5})
    ref = tok[["group_id", "response_index"]].assign(ref_logp=-1.0)
    tgt = tok[["group_id", "response_index"]].assign(target=0.5)
    with pytest.raises(ValueError, match=r"same number of responses in every group; found sizes \[2, 3\]"):
        group_items(tok, ref, tgt, "train")
    with pytest.raises(ValueError, match="lack a cached reference log-prob"):
        group_items(tok[tok.group_id == "b"], ref.iloc[:3], tgt, "train")
    items, lengths = group_items(tok[tok.group_id == "b"], ref, tgt, "train")
    assert len(items) == 1 and len(items[0][0]) == 3 and lengths == [3]



def test_reward_aware_loss_k2_uses_pair_form_and_reports_agreement():
    from rpo_pipeline.losses import reward_aware_loss
    from rpo_pipeline.policy import group_collate

    torch.manual_seed(0)
    model = TableLM()
    items = [([[1, 2, 3], [1, 4, 5, 2]], [1, 1], [-3.0, -4.0], [1.0, -1.0]),
             ([[0, 3], [0, 5, 5]], [1, 1], [-2.0, -2.5], [-0.5, 0.5])]
    batch = group_collate(0)(items)
    beta, eta = 0.5, 2.0
    loss, m = reward_aware_loss("bwd_kl", beta, eta)(model, batch)
    logp, _ = model(batch)
    a = (beta * (logp.detach() - batch["ref_logps"])).view(2, 2)
    b = (eta * batch["targets"]).view(2, 2)
    expected = rpo_pair(a[:, 0] - a[:, 1], b[:, 0] - b[:, 1], "bwd_kl").mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-12)
    agree = ((a[:, 0] - a[:, 1]) * (b[:, 0] - b[:, 1]) > 0).double().mean().item()
    assert m["ranking_agreement"] == pytest.approx(agree)
    assert m["target_margin"] == pytest.approx(3.0)  # η·(r_best − r_worst): 2·2 and 2·1, mean 3
    assert m["rewards/chosen"] == pytest.approx(((a[0, 0] + a[1, 1]) / 2).item())
    # sft_weight: + w * per-token NLL of each group's best response (row 0 of group 0, row 3)
    with_sft, _ = reward_aware_loss("bwd_kl", beta, eta, sft_weight=0.5)(model, batch)
    _, n_tok = model(batch)
    nll = -(logp[0] + logp[3]).item() / (n_tok[0] + n_tok[3]).item()
    assert with_sft.item() == pytest.approx(expected.item() + 0.5 * nll, abs=1e-9)
    with pytest.raises(ValueError, match="unknown RPO distance"):
        reward_aware_loss("kl", beta, eta)
