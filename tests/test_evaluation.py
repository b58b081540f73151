"""Evaluation core: sampling (seeded, batched, EOS-trimmed), log-probs and the KL estimate, judges,
win rate, diversity, the per-policy metrics table, reports."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import base_params
from transformers import GPT2Config, GPT2LMHeadModel

from rpo_pipeline import reporting
from rpo_pipeline.evaluation import (
    completion_logps,
    distinct_n,
    eval_prompts,
    generate,
    make_gold_judge,
    policy_metrics,
    preference_accuracy,
    vader_positivity,
    win_rate,
)
from rpo_pipeline.params import EvaluationParams, GoldJudgeArgs, SamplingConfig


def sampling(**overrides) -> SamplingConfig:
    """conf/base's ``evaluation.sampling`` with ``overrides``."""
    return SamplingConfig(**{**base_params("evaluation")["sampling"], **overrides})


def judge_args(**overrides) -> GoldJudgeArgs:
    return GoldJudgeArgs(**{**base_params("evaluation")["gold_judge_args"], "device": "cpu", **overrides})

EOS, PAD = 0, 5


def tiny_lm(seed: int, vocab: int = 6) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                     eos_token_id=EOS, bos_token_id=EOS, pad_token_id=PAD)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # sharper than the random init, so the distributions differ visibly
        model.lm_head.weight.mul_(6)  # (tied to the input embedding)
    return model


PROMPTS = [[2, 3, 4, 1], [3], [4, 4, 2], [1, 2]]


def test_win_rate_distinct_and_accuracy_by_hand():
    # 1 vs 1 tie (.5), 1 vs 0 win, 2 vs 1 win, 2 vs 0 win -> 3.5 / 4
    assert win_rate(np.array([[1.0, 2.0]]), np.array([[1.0, 0.0]])) == 0.875
    ref = np.random.default_rng(0).normal(size=(5, 4))
    assert win_rate(ref, ref) == 0.5  # a policy against itself
    assert distinct_n(["a b a b", "A b"], 2) == 0.5  # (a b) x3, (b a) x1: 2 distinct of 4
    assert distinct_n(["one"], 2) == 0.0
    assert preference_accuracy(np.array([1.0, -1.0, 0.0, 2.0])) == 0.625


def test_vader_positivity_is_rescaled_compound():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    texts = ["a wonderful, moving film", "dull and awful", ""]
    pos = vader_positivity(texts)
    compound = [SentimentIntensityAnalyzer().polarity_scores(t)["compound"] for t in texts]
    np.testing.assert_allclose(pos, (np.array(compound) + 1) / 2)
    assert pos[0] > 0.75 and pos[1] < 0.25 and pos[2] == 0.5


def test_gold_judge_choices():
    assert make_gold_judge("vader", judge_args()) is vader_positivity
    assert make_gold_judge("none", judge_args()) is None
    with pytest.raises(ValueError, match="must be one of .*'vader', 'none', 'hf_classifier'"):
        make_gold_judge("gpt4", judge_args())
    with pytest.raises(ValueError, match="needs gold_judge_args.model"):
        make_gold_judge("hf_classifier", judge_args())


def test_hf_classifier_judge_is_p_positive(tmp_path):
    """A local sentiment classifier (tiny, random) through transformers' pipeline: P(POSITIVE)."""
    from transformers import GPT2ForSequenceClassification

    from rpo_pipeline.base_model import train_bpe_tokenizer

    tok = train_bpe_tokenizer(["a great film", "a dull film"] * 20, vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=16, n_layer=1, n_head=2,
                     pad_token_id=tok.pad_token_id, num_labels=2,
                     id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1})
    clf = GPT2ForSequenceClassification(cfg).eval()
    clf.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    judge = make_gold_judge("hf_classifier", judge_args(model=str(tmp_path)))
    texts = ["a great film", "a dull film"]
    got = judge(texts)
    with torch.no_grad():
        want = [torch.softmax(clf(**tok(t, return_tensors="pt")).logits, -1)[0, 1].item() for t in texts]
    np.testing.assert_allclose(got, want, atol=1e-5)
    with pytest.raises(ValueError, match="no 'GOOD' label"):
        make_gold_judge("hf_classifier", judge_args(model=str(tmp_path), positive_label="GOOD"))


def test_generate_is_seeded_trimmed_and_batch_independent():
    model = tiny_lm(0)
    cfg = sampling(n_samples=3, max_new_tokens=6, batch_size=2, seed=7)
    a, lp_a = generate(model, PROMPTS, cfg, EOS, PAD, device="cpu", progress=False)
    b, _ = generate(model, PROMPTS, cfg, EOS, PAD, device="cpu", progress=False)
    c, _ = generate(model, PROMPTS, sampling(n_samples=3, max_new_tokens=6, batch_size=2, seed=8),
                    EOS, PAD, device="cpu", progress=False)
    assert a == b and a != c
    assert [len(x) for x in a] == [3] * len(PROMPTS)
    for comps in a:
        for comp in comps:
            assert 1 <= len(comp) <= 6 and EOS not in comp[:-1]  # nothing after the first EOS
    assert any(comp[-1] == EOS for comps in a for comp in comps)
    # the model's own log-probs from generate == a separate scoring pass
    flat_p = [p for p, comps in zip(PROMPTS, a, strict=True) for _ in comps]
    flat_c = [comp for comps in a for comp in comps]
    scored = completion_logps(model, flat_p, flat_c, batch_size=3, device="cpu")
    np.testing.assert_allclose([x for lps in lp_a for x in lps], scored, atol=1e-4)
    # greedy: the same completion alone and inside a left-padded batch
    greedy, _ = generate(model, PROMPTS, cfg, EOS, PAD, greedy=True, device="cpu", progress=False)
    for p, g in zip(PROMPTS, greedy, strict=True):
        alone, _ = generate(model, [p], cfg, EOS, PAD, greedy=True, device="cpu", progress=False)
        assert alone[0] == g


def test_kl_estimate_matches_exact_kl():
    """Monte Carlo mean of log π − log π_ref over π's samples vs the exact KL by enumeration
    (two new tokens; a first-token EOS ends the completion)."""
    policy, ref = tiny_lm(1), tiny_lm(2)
    prompt = [2, 3]
    vocab = policy.config.vocab_size

    def exact_logp(model, y):
        return float(completion_logps(model, [prompt], [list(y)], device="cpu")[0])

    ys = [(EOS,)] + [(t1, t2) for t1, t2 in itertools.product(range(vocab), repeat=2) if t1 != EOS]
    lp_pol = np.array([exact_logp(policy, y) for y in ys])
    lp_ref = np.array([exact_logp(ref, y) for y in ys])
    assert math.isclose(np.exp(lp_pol).sum(), 1.0, rel_tol=1e-5)
    exact = float((np.exp(lp_pol) * (lp_pol - lp_ref)).sum())

    cfg = sampling(n_samples=500, max_new_tokens=2, batch_size=4, seed=0)
    comps, lps = generate(policy, [prompt] * 8, cfg, EOS, PAD, device="cpu", progress=False)
    flat = [c for cs in comps for c in cs]
    diff = np.array([x for lp in lps for x in lp]) - completion_logps(
        ref, [prompt] * len(flat), flat, batch_size=256, device="cpu")
    se = diff.std(ddof=1) / np.sqrt(len(diff))
    assert exact > 0.1  # the two models differ
    assert abs(diff.mean() - exact) < 4 * se, (diff.mean(), exact, se)


def test_eval_prompts_take_each_test_group_by_id():
    prompts = pd.DataFrame({
        "group_id": [3, 1, 2], "split": ["test", "test", "train"],
        "prompt_ids": [[9, 9, 9], [5, 6], [1]]})
    out = eval_prompts(prompts)
    assert out["group_id"].tolist() == [1, 3]
    assert out["prompt_ids"].tolist() == [[5, 6], [9, 9, 9]]
    assert eval_prompts(prompts, max_prompts=1)["group_id"].tolist() == [1]


def _samples() -> pd.DataFrame:
    rows = []
    # two prompts x two samples; dpo: higher gold, KL 1 and 3 per sample
    for policy, gold, rm, kl in (("reference", [0.2, 0.4, 0.6, 0.2], [0, 1, 0, 1], [0, 0, 0, 0]),
                                 ("dpo", [0.9, 0.4, 0.8, 0.9], [2, 1, 2, 2], [1, 3, 1, 3])):
        for i in range(4):
            rows.append({"policy": policy, "group_id": i // 2, "sample": i % 2, "prompt": f"p{i // 2}",
                         "completion": ["good fun", "good fun", "so good", "bad film"][i],
                         "tokens": 2 + i, "gold": gold[i], "rm": rm[i], "logp": -5.0 + kl[i],
                         "ref_logp": -5.0, "kl": kl[i]})
        rows.append({"policy": policy, "group_id": 0, "sample": -1, "prompt": "p0",
                     "completion": "greedy", "tokens": 1, "gold": 0.5, "rm": 0.0, "logp": -1.0,
                     "ref_logp": -1.0, "kl": 0.0})
        rows.append({**rows[-1], "group_id": 1, "prompt": "p1"})
    return pd.DataFrame(rows)


def test_policy_metrics_by_hand():
    m = policy_metrics(_samples()).set_index("policy")
    assert m.loc["dpo", "kl_to_reference"] == 2.0 and m.loc["reference", "kl_to_reference"] == 0.0
    assert m.loc["dpo", "gold_reward_mean"] == pytest.approx(0.75)
    # prompt 0: dpo [.9, .4] vs ref [.2, .4] -> 1 + 1 + 1 + .5; prompt 1: [.8, .9] vs [.6, .2] -> 4
    assert m.loc["dpo", "win_rate_gold"] == pytest.approx(7.5 / 8)
    assert m.loc["dpo", "win_rate_rm"] == pytest.approx(7.5 / 8)  # rm 1 vs 1 on prompt 0: a tie, half
    assert m.loc["reference", "win_rate_gold"] == 0.5
    assert m.loc["dpo", "length_mean"] == 3.5 and m.loc["dpo", "samples"] == 4  # greedy excluded
    assert m.loc["dpo", "distinct_2"] == pytest.approx(3 / 4)
    # how the reward model ranks each policy's own samples against gold
    # dpo: rm ranks [3, 1, 3, 3], gold ranks [3.5, 1, 2, 3.5] -> cov 3 / sqrt(3 * 4.5)
    assert m.loc["dpo", "rm_gold_spearman"] == pytest.approx(3 / 13.5 ** 0.5)
    # reference: rm ranks [1.5, 3.5, 1.5, 3.5], gold ranks [1.5, 3, 4, 1.5] -> -1 / sqrt(4 * 4.5)
    assert m.loc["reference", "rm_gold_spearman"] == pytest.approx(-1 / 18 ** 0.5)
    # pairs within a prompt whose gold differs: dpo prompt 0 (.9 > .4, rm 2 > 1) right, prompt 1
    # (.8 < .9, rm 2 = 2) a tie -> 1.5 / 2; reference: prompt 0 right, prompt 1 wrong -> 1 / 2
    assert m.loc["dpo", "rm_gold_pair_accuracy"] == 0.75
    assert m.loc["reference", "rm_gold_pair_accuracy"] == 0.5


def test_pair_agreement_counts_only_pairs_whose_gold_differs():
    from rpo_pipeline.evaluation import pair_agreement, rank_correlation

    assert pair_agreement([[1, 2, 3]], [[0.1, 0.2, 0.3]]) == 1.0  # 3 pairs, all right
    assert pair_agreement([[3, 2, 1]], [[0.1, 0.2, 0.3]]) == 0.0
    assert pair_agreement([[1, 2], [5, 5]], [[0.5, 0.5], [0.1, 0.9]]) == 0.5  # one pair: a score tie
    assert np.isnan(pair_agreement([[1, 2]], [[0.5, 0.5]]))  # no pair differs in gold
    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert np.isnan(rank_correlation([1, 1, 1], [1, 2, 3]))  # a constant score has no ranking


def test_reports_are_labelled():
    samples = _samples()
    metrics = policy_metrics(samples).assign(preference_accuracy=[0.5, 0.9])
    hist = {"loss": [{"step": 10, "value": 0.7}, {"step": 20, "value": 0.4}],
            "rewards/accuracies": [{"step": 10, "value": 0.6}, {"step": 20, "value": 0.8}],
            "eval_rewards/accuracies": [{"step": 20, "value": 0.75}]}
    rm_hist = {"loss": [{"step": 10, "value": 0.6}], "accuracy": [{"step": 10, "value": 0.7}],
               "val_accuracy": [{"step": 0, "value": 0.8}]}
    figs = [reporting.training_curves({"dpo": hist, "reward_model": rm_hist}),
            reporting.reward_vs_kl(samples, metrics), reporting.win_rates(metrics)]
    for fig in figs:
        for ax in fig.axes:
            assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
            assert ax.get_legend() is not None and ax.get_legend().get_texts()
    curves = figs[0].axes[1]
    assert {line.get_label() for line in curves.get_lines()} >= {"dpo train", "dpo val",
                                                                 "reward_model val"}
    table = reporting.samples_table(samples)
    assert len(table) == 2 and {"prompt", "reference", "dpo", "dpo_gold", "dpo_rm",
                                "dpo_samples_gold_mean"} <= set(table.columns)
    params = EvaluationParams.parse(base_params("evaluation", {"sampling.n_samples": 2,
                                                               "sampling.max_new_tokens": 8}))
    md = reporting.markdown_summary(metrics, samples, params)
    assert "| dpo | 0.750 |" in md and "win rate 0.938 (gold)" in md and "KL 2.00 nats" in md


def test_without_a_gold_judge_reports_use_the_reward_model():
    samples = _samples().assign(gold=np.nan)
    metrics = policy_metrics(samples).assign(preference_accuracy=[0.5, 0.9])
    assert metrics["gold_reward_mean"].isna().all() and metrics["win_rate_gold"].isna().all()
    assert metrics["rm_gold_spearman"].isna().all() and metrics["rm_gold_pair_accuracy"].isna().all()
    assert metrics.set_index("policy").loc["dpo", "win_rate_rm"] == pytest.approx(7.5 / 8)
    ax = reporting.reward_vs_kl(samples, metrics).axes[0]
    assert ax.get_ylabel() == "reward-model score (mean)"
    bars = reporting.win_rates(metrics).axes[0]
    assert [t.get_text() for t in bars.get_legend().get_texts()] == ["tie with reference", "reward model"]


def test_curve_steps_are_evenly_spaced_and_leave_out_the_trained_policy():
    from rpo_pipeline.evaluation import curve_steps

    assert curve_steps(100, 4) == [25, 50, 75]
    assert curve_steps(70, 4) == [18, 35, 52]  # round(17.5) = 18 (banker's rounding keeps it even)
    assert curve_steps(3, 4) == [1, 2]  # fewer steps than points: each step once
    assert curve_steps(10, 1) == []


def test_gold_at_matched_kl_interpolates_each_curve():
    from rpo_pipeline.evaluation import gold_at_matched_kl

    curves = pd.DataFrame({
        "method": ["a"] * 3 + ["b"] * 3, "step": [0, 5, 10] * 2,
        "kl": [0.0, 2.0, 6.0, 0.0, 1.0, 4.0], "gold": [0.5, 0.7, 0.8, 0.5, 0.6, 0.9]})
    kl, gold = gold_at_matched_kl(curves)
    assert kl == 4.0  # the largest KL both reach
    assert gold["b"] == pytest.approx(0.9)
    assert gold["a"] == pytest.approx(0.7 + 0.1 * (4.0 - 2.0) / (6.0 - 2.0))  # 0.75


def test_overoptimization_plot_has_gold_and_proxy_panels():
    curves = pd.DataFrame({"method": ["dpo"] * 2 + ["rpo"] * 2, "step": [0, 10] * 2,
                           "gold": [0.5, 0.7, 0.5, 0.6], "rm": [0.0, 1.0, 0.0, 2.0],
                           "kl": [0.0, 4.0, 0.0, 1.0], "sqrt_kl": [0.0, 2.0, 0.0, 1.0]})
    fig = reporting.overoptimization(curves)
    gold_ax, proxy_ax = fig.axes
    assert "Gold" in gold_ax.get_title() and "Proxy" in proxy_ax.get_title()
    assert [line.get_label() for line in gold_ax.get_lines()] == ["dpo", "rpo"]
    np.testing.assert_allclose(proxy_ax.get_lines()[1].get_ydata(), [0.0, 2.0])
