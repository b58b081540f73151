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

from rpo_pipeline.datasets import PretrainedHandle
from rpo_pipeline.evaluation import make_gold_judge, rm_gold_agreement
from rpo_pipeline.jobs import InferenceJob, PolicyJob, Split, infer
from rpo_pipeline.online import round_prompts, sample_groups
from rpo_pipeline.params import EvaluationParams, RpoOnlineParams
from rpo_pipeline.pipelines.policy_training.nodes import run_policy_job
from rpo_pipeline.policy import group_items, reward_targets
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
    job = InferenceJob("generate", str(policy.path), p.device, {
        "prompts": prompts["prompt_ids"].tolist(), "cfg": cfg, "eos_id": tok.eos_token_id,
        "pad_id": tok.pad_token_id, "greedy": False, "progress": p.train.progress,
        "desc": f"{p.group} round {round_index}: sample"}, precision=p.train.precision)
    completions, logps = infer(job, p.train.num_processes, p.train.backend, policy.load)
    samples = sample_groups(prompts, completions, logps)
    log.info("%s round %d: %d prompts x %d samples in %.1f s", p.group, round_index, len(prompts),
             cfg.n_samples, time.perf_counter() - t0)
    return samples


def label_round(samples: pd.DataFrame, reward_model: PretrainedHandle, sft_model: PretrainedHandle,
                tokenizer: PretrainedHandle, reward_stats: dict, params: dict[str, Any],
                evaluation_params: dict[str, Any]) -> pd.DataFrame:
    """Reward-model score, normalised target and log π_ref of every sample, and its gold score
    (``evaluation.gold_judge``; NaN without one) to monitor the reward model on the policy's own
    samples. Training reads the reward model's targets only, never gold.

    π_ref's log-probs are computed here (the samples are new, so no cache entry can hold them).
    """
    t0 = time.perf_counter()
    p = RpoOnlineParams.parse(params)
    e = EvaluationParams.parse(evaluation_params)
    tok = tokenizer.load()
    pad = tok.pad_token_id
    seqs, starts = samples["input_ids"].map(list).tolist(), samples["response_start"].tolist()
    t = p.train
    rewards = infer(InferenceJob("rewards", str(reward_model.path), p.device, {
        "sequences": seqs, "response_starts": starts, "pad_id": pad, "batch_size": p.sampling.batch_size},
        precision=t.precision), t.num_processes, t.backend, lambda: reward_model.load(device=p.device))
    ref_logp, _ = infer(InferenceJob("response_logps", str(sft_model.path), p.device, {
        "input_ids": seqs, "response_starts": starts, "pad_id": pad, "batch_size": p.sampling.batch_size,
        "progress": False}, precision=t.precision), t.num_processes, t.backend, sft_model.load)
    judge = make_gold_judge(e.gold_judge, e.gold_judge_args)
    if judge is None:
        gold = np.full(len(samples), np.nan)
    else:
        texts = tok.batch_decode([s[k:] for s, k in zip(seqs, starts, strict=True)], skip_special_tokens=True)
        gold = judge([t.strip() for t in texts])
    out = samples.assign(reward=np.asarray(rewards, dtype=float), ref_logp=ref_logp,
                         gold=np.asarray(gold, dtype=float))
    targets = reward_targets(out, out, reward_stats, "reward_model", p.reward_normalization)
    out = out.merge(targets, on=["group_id", "response_index"], how="left")
    log.info("%s: labelled %d samples in %.1f s; reward mean %.3f", p.group, len(out),
             time.perf_counter() - t0, out["reward"].mean())
    return out


def train_round(policy: PretrainedHandle, tokenizer: PretrainedHandle, labelled: pd.DataFrame,
                params: dict[str, Any], *, round_index: int
                ) -> tuple[Any, MetricsPayload, MetricsPayload]:
    """``train.steps`` RPO steps on this round's samples, from the current policy.

    Besides the training curves, logs the samples' reward-model score (of the policy that entered
    the round), its spread within a prompt, and their length; with a gold judge also their gold
    score and how well the reward model ranks them (``rm_gold_spearman``,
    ``rm_gold_pair_accuracy``, as the evaluation computes them for each policy).
    """
    p = RpoOnlineParams.parse(params)
    t = p.train
    train = t.model_copy(update={
        "seed": t.seed + round_index,
        "checkpoint_dir": None if t.checkpoint_dir is None else f"{t.checkpoint_dir}/round_{round_index}"})
    p = p.model_copy(update={"train": train})
    items = group_items(labelled, labelled[["group_id", "response_index", "ref_logp"]],
                        labelled[["group_id", "response_index", "target"]], "train")
    job = PolicyJob("rpo_online", str(policy.path), tokenizer.load().pad_token_id, p.model_dump(),
                    Split(*items), Split([], []))
    model, history, metrics = run_policy_job(policy, job, p)
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
