"""rpo_online nodes: one round = sample from the current policy, label, train.

Thin wrappers over ``rpo_pipeline.online`` (prompts, sample groups), ``policy.reward_targets`` /
``policy.group_items`` and the one training loop (``policy_training.nodes.run_policy_job``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pandas as pd

from rpo_pipeline.datasets import CheckpointDir, ModelSource, PretrainedHandle
from rpo_pipeline.evaluation import make_gold_judge, rm_gold_agreement
from rpo_pipeline.jobs import GenerateJob, ResponseLogpsJob, RewardModelJob, RewardsJob, RpoOnlineJob, Split, fit, infer
from rpo_pipeline.online import KEY, refresh_pairs, round_prompts, sample_groups
from rpo_pipeline.params import EvaluationParams, RewardModelParams, RpoOnlineParams
from rpo_pipeline.pipelines.policy_training.nodes import run_policy_job
from rpo_pipeline.policy import group_items, reward_targets
from rpo_pipeline.reward_model import (
    RewardModel,
    RewardPair,
    ensemble_reward,
    score,
    training_items,
    with_bootstrap,
)
from rpo_pipeline.tracking import MetricsPayload, scalars

log = logging.getLogger(__name__)


def sample_round(policy: PretrainedHandle, tokenizer: PretrainedHandle,
                 tokenized_prompts: pd.DataFrame, params: dict[str, Any], *, round_index: int
                 ) -> pd.DataFrame:
    """K samples from the current policy on this round's fresh slice of train prompts.

    Round r samples with ``sampling.seed + r``; the samples are those of ``evaluation.generate``
    (the same seeded sampler as the evaluation stage), whatever the number of processes.
    """
    t0 = time.perf_counter()
    p = RpoOnlineParams.parse(params)
    tok = tokenizer.load()
    prompts = round_prompts(tokenized_prompts, round_index, p.prompts_per_round, p.train.seed)
    cfg = p.sampling.model_copy(update={"seed": p.sampling.seed + round_index})
    job = GenerateJob(model_path=str(policy.path), device=p.device, precision=p.train.precision,
                      prompts=prompts["prompt_ids"].tolist(), cfg=cfg, eos_id=tok.eos_token_id,
                      pad_id=tok.pad_token_id, greedy=False, progress=p.train.progress,
                      desc=f"{p.group} round {round_index}: sample")
    completions, logps = infer(job, p.train.num_processes, p.train.backend, policy.load)
    samples = sample_groups(prompts, completions, logps)
    log.info("%s round %d: %d prompts x %d samples in %.1f s", p.group, round_index, len(prompts),
             cfg.n_samples, time.perf_counter() - t0)
    return samples


def _gold_stats(judge, groups: pd.DataFrame) -> dict[str, float]:
    """Mean and std of the gold judge over the train split's responses: the z-scoring of gold
    targets (``judge: gold``), as ``reward_stats`` is for the reward model's."""
    train = groups[groups["split"] == "train"]
    texts = [str(r) for rs in train["responses"] for r in rs]
    g = np.asarray(judge(texts), dtype=float)
    return {"mean": float(g.mean()), "std": float(g.std(ddof=0)), "count": len(g)}


def _rewards(reward_model: PretrainedHandle, seqs: list[list[int]], starts: list[int],
             p: RpoOnlineParams, rm: RewardModelParams) -> tuple[np.ndarray, np.ndarray]:
    """The reward model's training target (``reward_model.ensemble.aggregate``) and the members'
    spread for each sample."""
    t = p.train
    members = infer(RewardsJob(model_path=str(reward_model.path), device=p.device, precision=t.precision,
                               sequences=seqs, response_starts=starts,
                               batch_size=p.sampling.batch_size),
                    t.num_processes, t.backend, lambda: reward_model.load(device=p.device))
    return ensemble_reward(members, rm.ensemble.aggregate, rm.ensemble.penalty)


def label_round(samples: pd.DataFrame, reward_model: PretrainedHandle, sft_model: PretrainedHandle,
                tokenizer: PretrainedHandle, reward_stats: dict, groups: pd.DataFrame,
                gold_judge_model: ModelSource, params: dict[str, Any], evaluation_params: dict[str, Any],
                reward_model_params: dict[str, Any]) -> pd.DataFrame:
    """Reward-model score (and the ensemble's spread), log π_ref and gold score of every sample,
    and the normalised target training reads: the reward model's (``judge: reward_model``) or
    gold's (``judge: gold``, the upper bound without a proxy).

    Gold (``evaluation.gold_judge``; NaN without one) otherwise only monitors the reward model on
    the policy's own samples and picks the pairs of an on-policy refresh. π_ref's log-probs are
    computed here (the samples are new, so no cache entry can hold them).
    """
    t0 = time.perf_counter()
    p = RpoOnlineParams.parse(params)
    e = EvaluationParams.parse(evaluation_params)
    rm = RewardModelParams.parse(reward_model_params)
    judge = make_gold_judge(e.gold_judge, e.gold_judge_args, gold_judge_model.name_or_path)
    needs_gold = p.judge == "gold" or p.refresh.labels_per_round > 0
    if judge is None and needs_gold:
        raise ValueError("rpo_online.judge = 'gold' and rpo_online.refresh.labels_per_round > 0 need "
                         "a gold judge; evaluation.gold_judge is 'none'")
    tok = tokenizer.load()
    seqs, starts = samples["input_ids"].map(list).tolist(), samples["response_start"].tolist()
    t = p.train
    reward, spread = _rewards(reward_model, seqs, starts, p, rm)
    ref_logp, _ = infer(ResponseLogpsJob(model_path=str(sft_model.path), device=p.device,
                                         precision=t.precision, input_ids=seqs,
                                         response_starts=starts,
                                         batch_size=p.sampling.batch_size,
                                         progress=False), t.num_processes, t.backend, sft_model.load)
    if judge is None:
        gold = np.full(len(samples), np.nan)
    else:
        texts = tok.batch_decode([s[k:] for s, k in zip(seqs, starts, strict=True)], skip_special_tokens=True)
        gold = judge([t.strip() for t in texts])
    out = samples.assign(reward=reward, reward_std=spread, ref_logp=ref_logp,
                         gold=np.asarray(gold, dtype=float))
    out = out.merge(_targets(out, p, reward_stats, judge, groups), on=KEY, how="left")
    log.info("%s: labelled %d samples in %.1f s; reward mean %.3f", p.group, len(out),
             time.perf_counter() - t0, out["reward"].mean())
    return out


def _targets(labelled: pd.DataFrame, p: RpoOnlineParams, reward_stats: dict, judge,
             groups: pd.DataFrame) -> pd.DataFrame:
    if p.judge == "gold":
        stats = _gold_stats(judge, groups) if p.reward_normalization == "zscore" else None
        by_gold = labelled.drop(columns="reward").rename(columns={"gold": "reward"})
        return reward_targets(by_gold, by_gold, stats, "reward_model", p.reward_normalization)
    return reward_targets(labelled, labelled, reward_stats, "reward_model", p.reward_normalization)


def refresh_reward_model(labelled: pd.DataFrame, reward_model: PretrainedHandle,
                         tokenizer: PretrainedHandle, tokenized: pd.DataFrame, pairs: pd.DataFrame,
                         groups: pd.DataFrame, params: dict[str, Any],
                         reward_model_params: dict[str, Any], *, round_index: int,
                         previous_pairs: pd.DataFrame | None = None
                         ) -> tuple[Any, dict[str, float], pd.DataFrame, MetricsPayload]:
    """On-policy refresh (iterative RLHF): ``refresh.labels_per_round`` pairs of this round's
    samples labelled by the gold judge (``online.refresh_pairs``), added to the earlier rounds',
    and ``refresh.steps`` Bradley–Terry steps of the current reward model on the offline training
    pairs and the labelled ones (half of what it draws, the labelled pairs repeated).

    Returns the refreshed reward model, its normalisation statistics (over a seeded 512 of the
    offline train responses), every labelled pair so far and the metrics: the reward model's
    gold agreement on this round's samples before and after.
    """
    t0 = time.perf_counter()
    p = RpoOnlineParams.parse(params)
    rm = RewardModelParams.parse(reward_model_params)
    new = refresh_pairs(labelled, p.refresh.labels_per_round, p.train.seed, round_index)
    all_pairs = new if previous_pairs is None else pd.concat([previous_pairs, new], ignore_index=True)
    offline, offline_lengths = training_items(tokenized, pairs, groups, rm.comparisons,
                                              rm.margin_column)
    labelled_items = [RewardPair(list(c), list(r), 0.0, int(k), int(k)) for c, r, k in zip(
        all_pairs["chosen_input_ids"], all_pairs["rejected_input_ids"], all_pairs["response_start"],
        strict=True)]
    repeat = max(1, len(offline) // max(len(labelled_items), 1))
    items = offline + labelled_items * repeat
    lengths = offline_lengths + [max(len(i.chosen_input_ids), len(i.rejected_input_ids))
                                 for i in labelled_items] * repeat
    if rm.ensemble.members > 1 and rm.ensemble.bootstrap:
        items = with_bootstrap(items, rm.ensemble.members, p.train.seed + round_index)
    train = rm.train.model_copy(update={"steps": p.refresh.steps, "seed": rm.train.seed + round_index,
                                        "warmup_steps": min(rm.train.warmup_steps, p.refresh.steps)})
    rm = rm.model_copy(update={"train": train})
    job = RewardModelJob(config=None, params=rm, train=Split(items, lengths),
                         init_from=str(reward_model.path))
    model, result, _ = fit(job, train.num_processes, train.backend, rm.device,
                           lambda: RewardModel.continue_training(str(reward_model.path), train.seed,
                                                                 rm.device),
                           RewardModel.from_pretrained)
    seqs, starts = labelled["input_ids"].map(list).tolist(), labelled["response_start"].tolist()
    after = labelled.assign(reward=ensemble_reward(score(model, seqs, starts))[0])
    stats = _train_stats(model, tokenized, seed=p.train.seed)
    before_agreement = rm_gold_agreement(labelled, score="reward")
    after_agreement = rm_gold_agreement(after, score="reward")
    log.info("%s round %d: reward model refreshed on %d labelled pairs (%d new) in %.1f s; "
             "Spearman with gold on the round's samples %.3f -> %.3f", p.group, round_index,
             len(all_pairs), len(new), time.perf_counter() - t0,
             before_agreement["rm_gold_spearman"], after_agreement["rm_gold_spearman"])
    return model, stats, all_pairs, scalars({
        "refresh_labels": len(new), "refresh_labels_total": len(all_pairs),
        "refresh_seconds": time.perf_counter() - t0,
        **{f"refresh_before_{k}": v for k, v in before_agreement.items()},
        **{f"refresh_after_{k}": v for k, v in after_agreement.items()}})


def _train_stats(model: Any, tokenized: pd.DataFrame, seed: int, n: int = 512
                 ) -> dict[str, float]:
    """Mean and std of the model's rewards over a seeded ``n`` of the train responses."""
    train = tokenized[tokenized["split"] == "train"]
    rows = train.iloc[np.random.default_rng(seed).permutation(len(train))[:n]]
    r = ensemble_reward(score(model, rows["input_ids"].map(list).tolist(),
                              rows["response_start"].tolist()))[0]
    return {"mean": float(r.mean()), "std": float(r.std(ddof=0)), "count": int(len(r))}


def rescore_round(labelled: pd.DataFrame, reward_model: PretrainedHandle, reward_stats: dict,
                  params: dict[str, Any],
                  reward_model_params: dict[str, Any]) -> pd.DataFrame:
    """The round's samples scored again by the refreshed reward model, and their new targets."""
    p = RpoOnlineParams.parse(params)
    rm = RewardModelParams.parse(reward_model_params)
    seqs, starts = labelled["input_ids"].map(list).tolist(), labelled["response_start"].tolist()
    reward, spread = _rewards(reward_model, seqs, starts, p, rm)
    out = labelled.assign(reward=reward, reward_std=spread)
    if p.judge == "gold":
        return out  # the targets are gold's
    return out.drop(columns=["target"]).merge(_targets(out, p, reward_stats, None, None), on=KEY,
                                              how="left")


def count_gold_labels(reward_model_history: dict, params: dict[str, Any],
                      refresh_pairs: pd.DataFrame | None = None) -> MetricsPayload:
    """``rpo_online.gold_labels_used``: the labels online RPO cost, so that methods compare at
    equal labelling cost. The reward model's offline training pairs, the refresh's labelled pairs,
    and with ``judge: gold`` every sample the judge scored."""
    p = RpoOnlineParams.parse(params)
    offline = int(reward_model_history["train_pairs"][-1]["value"])
    refresh = 0 if refresh_pairs is None else len(refresh_pairs)
    judged = p.rounds * p.prompts_per_round * p.sampling.n_samples if p.judge == "gold" else 0
    return scalars({"gold_labels_used": offline + refresh + judged,
                    "gold_labels_offline": offline, "gold_labels_refresh": refresh,
                    "gold_labels_judged": judged})


def train_round(policy: PretrainedHandle, tokenizer: PretrainedHandle, labelled: pd.DataFrame,
                checkpoints: CheckpointDir, params: dict[str, Any], *, round_index: int
                ) -> tuple[Any, MetricsPayload, MetricsPayload]:
    """``train.steps`` RPO steps on this round's samples, from the current policy.

    Besides the training curves, logs the samples' reward-model score (of the policy that entered
    the round), its spread within a prompt, and their length; with a gold judge also their gold
    score and how well the reward model ranks them (``rm_gold_spearman``,
    ``rm_gold_pair_accuracy``, as the evaluation computes them for each policy).
    """
    p = RpoOnlineParams.parse(params)
    t = p.train
    train = t.model_copy(update={"seed": t.seed + round_index})
    p = p.model_copy(update={"train": train})
    items = group_items(labelled, labelled[["group_id", "response_index", "ref_logp"]],
                        labelled[["group_id", "response_index", "target"]], "train")
    job = RpoOnlineJob(model_path=str(policy.path), params=p, train=Split(*items), val=Split([], []),
                       val_pairs=Split([], []), checkpoint_dir=str(checkpoints.path))
    model, _, history, metrics = run_policy_job(policy, job, p)
    spread = labelled.groupby("group_id")["reward"].std(ddof=0).mean()
    gold = {}
    if labelled["gold"].notna().all():
        gold = {"sample_gold_mean": float(labelled["gold"].mean()),
                **rm_gold_agreement(labelled, score="reward")}
    return model, history, metrics | scalars(gold | {
        "sample_reward_mean": float(labelled["reward"].mean()),
        "sample_reward_spread": float(spread),
        "sample_tokens_mean": float(labelled["tokens"].mean()),
        "sample_logp_mean": float(labelled["logp"].mean()),
        "kl_round_start_to_reference": float((labelled["logp"] - labelled["ref_logp"]).mean()),
        "prompts": labelled["group_id"].nunique()})
