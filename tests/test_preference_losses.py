"""DPO-family losses: hand-computed values, TRL's formulas, and the policy loss over a batch."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TableLM

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
        preference_loss("kto", beta=0.1)


def test_policy_loss_uses_cached_reference_and_reports_trl_metrics():
    torch.manual_seed(0)
    model = TableLM()
    items = [([1, 2, 3, 4], 2, [1, 2, 5], 2, -3.0, -2.0), ([0, 3, 3], 1, [0, 3, 1, 1], 1, -4.0, -5.0)]
    batch = policy_collate(pad_id=0)(items)
    beta = 0.1
    loss, m = preference_loss("sigmoid", beta)(model, batch)
    logp, _ = model(batch)
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


def test_ipo_metrics_use_the_per_token_averaged_log_ratios_of_its_loss():
    """With ipo, rewards/* come from the log-ratios the loss uses (averaged per response token)."""
    torch.manual_seed(0)
    model = TableLM()
    # responses of different lengths (chosen 2 and 4 tokens, rejected 1 and 3)
    items = [([1, 2, 3, 4], 2, [1, 2, 5], 2, -3.0, -2.0), ([0, 3, 3, 2, 1], 1, [0, 3, 1, 1], 1, -4.0, -9.0)]
    batch = policy_collate(pad_id=0)(items)
    beta = 0.5
    loss, m = preference_loss("ipo", beta)(model, batch)
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


def test_disable_dropout_makes_train_mode_log_probs_equal_eval_mode():
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
