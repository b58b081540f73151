"""DPO-family losses: hand-computed values, TRL's formulas, and the policy loss over a batch."""

from __future__ import annotations

import math

import pytest
import torch

from rpo_pipeline.batching import response_logprobs
from rpo_pipeline.losses import dpo_sigmoid, hinge, ipo, preference_loss
from rpo_pipeline.policy import policy_collate

DELTA = torch.tensor([2.0, -1.0, 0.0], dtype=torch.float64)


def _logsig(x):
    return -math.log1p(math.exp(-x))


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


def _trl_reference(loss_type, pi_c, pi_r, ref_c, ref_r, beta, n_c=None, n_r=None):
    """TRL 1.16 DPOTrainer._compute_loss formulas (reverse KL), written out for the comparison."""
    c, r = pi_c - ref_c, pi_r - ref_r
    if loss_type == "sigmoid":
        return -torch.nn.functional.logsigmoid(beta * (c - r))
    if loss_type == "hinge":
        return torch.relu(1 - beta * (c - r))
    return (c / n_c - r / n_r - 1 / (2 * beta)) ** 2  # ipo: per-token averaged


def test_losses_match_trl_formulas_on_random_logps():
    """Same random log-probs through our losses and TRL's (source: trl/trainer/dpo_trainer.py)."""
    pytest.importorskip("trl")
    g = torch.Generator().manual_seed(0)
    pi_c, pi_r, ref_c, ref_r = (-torch.rand(64, generator=g, dtype=torch.float64) * 80
                                for _ in range(4))
    n_c = torch.randint(5, 60, (64,), generator=g).double()
    n_r = torch.randint(5, 60, (64,), generator=g).double()
    for beta in (0.05, 0.1, 0.5):
        delta = (pi_c - ref_c) - (pi_r - ref_r)
        for name, ours in (("sigmoid", dpo_sigmoid(delta, beta)), ("hinge", hinge(delta, beta))):
            torch.testing.assert_close(ours, _trl_reference(name, pi_c, pi_r, ref_c, ref_r, beta))
        avg = (pi_c / n_c - ref_c / n_c) - (pi_r / n_r - ref_r / n_r)
        torch.testing.assert_close(ipo(avg, beta),
                                   _trl_reference("ipo", pi_c, pi_r, ref_c, ref_r, beta, n_c, n_r))


def test_trl_source_still_has_these_formulas():
    """Guard the comparison above: TRL's implementation still reads as transcribed."""
    trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
    import inspect

    src = inspect.getsource(trl_dpo.DPOTrainer._compute_loss)
    assert "-F.logsigmoid(self.beta * delta_score)" in src
    assert "torch.relu(1 - self.beta * delta_score)" in src
    assert "(ipo_delta - 1 / (2 * self.beta)) ** 2" in src


def test_unknown_loss_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown loss 'kto'; valid: \['hinge', 'ipo', 'sigmoid'\]"):
        preference_loss("kto", beta=0.1)


class _Table(torch.nn.Module):
    """A 'model' whose next-token logits are a learnable table: log-probs are easy to control."""

    def __init__(self, vocab=6):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.randn(vocab, vocab))

    def forward(self, input_ids, **_):
        return type("Out", (), {"logits": self.logits[input_ids]})()


def test_policy_loss_uses_cached_reference_and_reports_trl_metrics():
    torch.manual_seed(0)
    model = _Table()
    items = [([1, 2, 3, 4], 2, [1, 2, 5], 2, -3.0, -2.0), ([0, 3, 3], 1, [0, 3, 1, 1], 1, -4.0, -5.0)]
    batch = policy_collate(pad_id=0)(items)
    beta = 0.1
    loss, m = preference_loss("sigmoid", beta)(model, batch)
    logp, _, _ = response_logprobs(model, batch)
    ref = torch.tensor([-3.0, -4.0, -2.0, -5.0], dtype=torch.float64)
    ratio = logp.detach() - ref
    delta = ratio[:2] - ratio[2:]
    assert loss.item() == pytest.approx((-torch.nn.functional.logsigmoid(beta * delta)).mean().item())
    assert m["rewards/chosen"] == pytest.approx((beta * ratio[:2]).mean().item())
    assert m["rewards/margins"] == pytest.approx((beta * delta).mean().item())
    assert m["rewards/accuracies"] == pytest.approx((delta > 0).double().mean().item())
    assert m["logps/rejected"] == pytest.approx(logp[2:].mean().item())
    with_sft, _ = preference_loss("sigmoid", beta, sft_weight=0.5)(model, batch)
    n_c = 2 + 2  # response tokens of the two chosen responses
    assert with_sft.item() == pytest.approx(loss.item() - 0.5 * logp[:2].sum().item() / n_c)
    loss.backward()
    assert model.logits.grad.abs().sum() > 0
