"""rpo_pipeline.losses: DPO-family and RPO losses against hand-checked numbers and TRL."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import TableLM

from rpo_pipeline.losses import dpo_sigmoid, hinge, ipo, preference_loss_fn, rpo_group, rpo_pair
from rpo_pipeline.policy import PreferencePair, policy_collate

DELTA = torch.tensor([2.0, -1.0, 0.0], dtype=torch.float64)

def _logsig(x):
    return -math.log1p(math.exp(-x))

def _trl_dpo_loss(loss_type, beta, tok_c, tok_r, mask_c, mask_r, ref_c, ref_r):
    """TRL's own DPOTrainer._compute_loss on per-token policy log-probs we choose.

    A stand-in trainer carries the attributes the method reads; the stand-in model returns the
    given token log-probs (zero outside the completion, as TRL's -100 labels give) and zeros for
    the other fused-head outputs, which feed TRL's logging only. Reference log-probs are
    'precomputed', as our cache provides them.
    """
    import collections
    import types

    from trl.trainer.dpo_trainer import DPOTrainer

    b, t = tok_c.shape
    comp = torch.cat([torch.zeros(2 * b, 1, dtype=torch.long), torch.cat([mask_c, mask_r]).long()], 1)
    per_tok = torch.cat([tok_c, tok_r]) * comp[:, 1:]

    class Out:
        log_probs, aux_loss = per_tok, None

        def __getattr__(self, name):
            z = torch.zeros_like(per_tok)
            return z.bool() if name.startswith("is_") else z

    class Model(torch.nn.Module):
        def forward(self, **_):
            return Out()

    model = Model()
    trainer = types.SimpleNamespace(
        model=model, aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta,
        use_weighting=False, _total_train_tokens=0, _tp_size=1, ref_model=None,
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)),
        accelerator=types.SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x,
                                          gather_for_metrics=lambda x: x))
    inputs = {"input_ids": torch.zeros(2 * b, t + 1, dtype=torch.long),
              "attention_mask": torch.ones(2 * b, t + 1, dtype=torch.long),
              "completion_mask": comp, "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    return DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)

def _sig(x):
    return 1 / (1 + math.exp(-x))

def _groups_and_scores():
    import pandas as pd

    groups = pd.DataFrame({"group_id": ["g1", "g2"], "split": ["train", "val"],
                           "scores": [[1.0, 3.0, 2.0], [0.0, 4.0, 2.0]]})
    scores = pd.DataFrame({"group_id": ["g1"] * 3 + ["g2"] * 3, "response_index": [0, 1, 2] * 2,
                           "split": ["train"] * 3 + ["val"] * 3, "reward": [2.0, 4.0, 6.0, 1.0, 1.0, 4.0]})
    return groups, scores


def test_sigmoid_and_cdpo_hand_computed():
    beta = 0.5
    expected = [-_logsig(beta * d) for d in (2.0, -1.0, 0.0)]  # 0.313262, 0.974077, 0.693147
    assert dpo_sigmoid(DELTA, beta).tolist() == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx([0.3132617, 0.9740770, 0.6931472], abs=1e-6)
    eps = 0.1
    cdpo = [-(1 - eps) * _logsig(beta * d) - eps * _logsig(-beta * d) for d in (2.0, -1.0, 0.0)]
    assert dpo_sigmoid(DELTA, beta, eps).tolist() == pytest.approx(cdpo, abs=1e-12)
    assert cdpo[0] == pytest.approx(0.9 * 0.3132617 + 0.1 * 1.3132617, abs=1e-6)


def test_ipo_and_hinge_hand_computed():
    beta = 0.25  # 1/(2β) = 2
    assert ipo(DELTA, beta).tolist() == [0.0, 9.0, 4.0]
    assert hinge(DELTA, beta).tolist() == [0.5, 1.25, 1.0]
    assert hinge(torch.tensor([8.0]), beta).item() == 0.0


def test_losses_match_trl_dpo_trainer_on_random_logps():
    """sigmoid, hinge and ipo against TRL's DPOTrainer._compute_loss on the same random log-probs."""
    pytest.importorskip("trl")
    g = torch.Generator().manual_seed(0)
    b, t = 16, 20
    tok_c, tok_r = (-torch.rand(b, t, generator=g, dtype=torch.float64) * 4 for _ in range(2))
    mask_c, mask_r = ((torch.rand(b, t, generator=g) > 0.3).long() for _ in range(2))
    ref_c, ref_r = (-torch.rand(b, generator=g, dtype=torch.float64) * 40 for _ in range(2))
    pi_c, pi_r = (tok_c * mask_c).sum(1), (tok_r * mask_r).sum(1)
    n_c, n_r = mask_c.sum(1).clamp(min=1), mask_r.sum(1).clamp(min=1)
    for beta in (0.05, 0.1, 0.5):
        delta = (pi_c - ref_c) - (pi_r - ref_r)
        avg_delta = (pi_c - ref_c) / n_c - (pi_r - ref_r) / n_r
        for name, ours in (("sigmoid", dpo_sigmoid(delta, beta)), ("hinge", hinge(delta, beta)),
                           ("ipo", ipo(avg_delta, beta))):
            theirs = _trl_dpo_loss(name, beta, tok_c, tok_r, mask_c, mask_r, ref_c, ref_r)
            torch.testing.assert_close(ours.mean(), theirs, msg=f"{name}, beta={beta}")


def test_unknown_loss_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown loss 'kto'; valid: \['hinge', 'ipo', 'sigmoid'\]"):
        preference_loss_fn("kto", beta=0.1)


def test_policy_loss_uses_cached_reference_and_reports_trl_metrics():
    torch.manual_seed(0)
    model = TableLM()
    items = [PreferencePair([1, 2, 3, 4], 2, [1, 2, 5], 2, -3.0, -2.0),
             PreferencePair([0, 3, 3], 1, [0, 3, 1, 1], 1, -4.0, -5.0)]
    batch = policy_collate()(items)
    beta = 0.1
    loss, m = preference_loss_fn("sigmoid", beta)(model, batch)
    logp, _ = model(batch)
    ref = torch.tensor([-3.0, -4.0, -2.0, -5.0], dtype=torch.float64)
    ratio = logp.detach() - ref
    delta = ratio[:2] - ratio[2:]
    assert loss.item() == pytest.approx((-torch.nn.functional.logsigmoid(beta * delta)).mean().item())
    assert m["rewards/chosen"] == pytest.approx((beta * ratio[:2]).mean().item())
    assert m["rewards/margins"] == pytest.approx((beta * delta).mean().item())
    assert m["rewards/accuracies"] == pytest.approx((delta > 0).double().mean().item())
    assert m["logps/rejected"] == pytest.approx(logp[2:].mean().item())
    with_sft, _ = preference_loss_fn("sigmoid", beta, sft_weight=0.5)(model, batch)
    n_c = 2 + 2  # response tokens of the two chosen responses
    assert with_sft.item() == pytest.approx(loss.item() - 0.5 * logp[:2].sum().item() / n_c)
    loss.backward()
    assert model.logits.grad.abs().sum() > 0


def test_ipo_metrics_use_the_per_token_averaged_log_ratios_of_its_loss():
    """With ipo, rewards/* come from the log-ratios the loss uses (averaged per response token)."""
    torch.manual_seed(0)
    model = TableLM()
    # responses of different lengths (chosen 2 and 4 tokens, rejected 1 and 3)
    items = [PreferencePair([1, 2, 3, 4], 2, [1, 2, 5], 2, -3.0, -2.0),
             PreferencePair([0, 3, 3, 2, 1], 1, [0, 3, 1, 1], 1, -4.0, -9.0)]
    batch = policy_collate()(items)
    beta = 0.5
    loss, m = preference_loss_fn("ipo", beta)(model, batch)
    logp, n = model(batch)
    logp, n = logp.detach(), n.double()
    ref = torch.tensor([-3.0, -4.0, -2.0, -9.0], dtype=torch.float64)
    avg_ratio = (logp - ref) / n
    assert n.tolist() == [2, 4, 1, 3]
    delta = avg_ratio[:2] - avg_ratio[2:]
    assert loss.item() == pytest.approx(((delta - 1 / (2 * beta)) ** 2).mean().item())
    assert m["rewards/chosen"] == pytest.approx((beta * avg_ratio[:2]).mean().item())
    assert m["rewards/rejected"] == pytest.approx((beta * avg_ratio[2:]).mean().item())
    assert m["rewards/margins"] == pytest.approx((beta * delta).mean().item())
    assert m["rewards/accuracies"] == pytest.approx((delta > 0).double().mean().item())
    summed = logp - ref  # what the metrics were before: they must differ here
    assert m["rewards/margins"] != pytest.approx((beta * (summed[:2] - summed[2:])).mean().item())
    assert m["logps/chosen"] == pytest.approx(logp[:2].mean().item())  # log-probs stay summed


def test_disable_dropout_makes_train_mode_logps_equal_eval_mode():
    """Policy log-probs in training must be comparable with the cached (eval-mode) π_ref's."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from rpo_pipeline.jobs import disable_dropout

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=11, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        ref = model.eval()(ids).logits
        assert not torch.allclose(model.train()(ids).logits, ref)  # dropout 0.1 by default
        disable_dropout(model)
        assert torch.equal(model.train()(ids).logits, ref)


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
    from rpo_pipeline.losses import reward_aware_loss_fn
    from rpo_pipeline.policy import ResponseGroup, group_collate

    torch.manual_seed(0)
    model = TableLM()
    items = [ResponseGroup([[1, 2, 3], [1, 4, 5, 2]], [1, 1], [-3.0, -4.0], [1.0, -1.0]),
             ResponseGroup([[0, 3], [0, 5, 5]], [1, 1], [-2.0, -2.5], [-0.5, 0.5])]
    batch = group_collate()(items)
    beta, eta = 0.5, 2.0
    loss, m = reward_aware_loss_fn("bwd_kl", beta, eta)(model, batch)
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
    with_sft, _ = reward_aware_loss_fn("bwd_kl", beta, eta, sft_weight=0.5)(model, batch)
    _, n_tok = model(batch)
    nll = -(logp[0] + logp[3]).item() / (n_tok[0] + n_tok[3]).item()
    assert with_sft.item() == pytest.approx(expected.item() + 0.5 * nll, abs=1e-9)
    with pytest.raises(ValueError, match="unknown RPO distance"):
        reward_aware_loss_fn("kl", beta, eta)
