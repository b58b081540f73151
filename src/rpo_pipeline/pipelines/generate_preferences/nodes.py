"""generate_preferences nodes: sample K responses per prompt from π_SFT, judge, write groups.

Thin wrappers over ``evaluation.generate`` (the evaluation stage's seeded sampler), the judges
(``evaluation.make_gold_judge`` or ``reward_model.score``) and ``online.scored_groups``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pandas as pd

from rpo_pipeline.datasets import ModelSource, PretrainedHandle
from rpo_pipeline.evaluation import eval_prompts, make_gold_judge
from rpo_pipeline.jobs import GenerateJob, RewardsJob, infer
from rpo_pipeline.online import scored_groups
from rpo_pipeline.params import EvaluationParams, GeneratePreferencesParams
from rpo_pipeline.reward_model import ensemble_reward
from rpo_pipeline.tracking import MetricsPayload, scalars

log = logging.getLogger(__name__)
SOURCE = "generated:sft_model"


def sample_responses(policy: PretrainedHandle, tokenizer: PretrainedHandle,
                     tokenized_prompts: pd.DataFrame, params: dict[str, Any]) -> pd.DataFrame:
    """K samples per prompt of ``generate_preferences.splits``: group_id, response_index,
    prompt_ids, completion_ids, completion (text), logp."""
    t0 = time.perf_counter()
    p = GeneratePreferencesParams.parse(params)
    tok = tokenizer.load()
    prompts = pd.concat([eval_prompts(tokenized_prompts, s, p.max_prompts) for s in p.splits],
                        ignore_index=True)
    job = GenerateJob(model_path=str(policy.path), device=p.device, precision=p.precision,
                      prompts=prompts["prompt_ids"].tolist(), cfg=p.sampling,
                      eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, greedy=False,
                      progress=p.progress, desc="generate_preferences")
    completions, logps = infer(job, p.num_processes, p.backend, policy.load)
    rows = [(gid, k, list(ids), c, lp)
            for gid, ids, comps, lps in zip(prompts["group_id"], prompts["prompt_ids"],
                                            completions, logps, strict=True)
            for k, (c, lp) in enumerate(zip(comps, lps, strict=True))]
    out = pd.DataFrame(rows, columns=["group_id", "response_index", "prompt_ids",
                                      "completion_ids", "logp"])
    out["completion"] = [t.strip() for t in tok.batch_decode(out["completion_ids"].tolist(),
                                                             skip_special_tokens=True)]
    log.info("generate_preferences: %d prompts x %d samples in %.1f s", len(prompts),
             p.sampling.n_samples, time.perf_counter() - t0)
    return out


def _write(groups: pd.DataFrame, samples: pd.DataFrame, scores: np.ndarray, judge: str
           ) -> tuple[pd.DataFrame, MetricsPayload]:
    out = scored_groups(groups, samples.assign(score=scores), SOURCE)
    spread = out["scores"].map(lambda s: max(s) - min(s))
    metrics = {"groups": len(out), "responses": int(out["responses"].map(len).sum()),
               "score_mean": float(np.mean(scores)), "score_spread_mean": float(spread.mean()),
               "groups_all_tied": int((spread == 0).sum()),
               "duplicate_responses": int(sum(len(r) - len(set(r)) for r in out["responses"]))}
    log.info("generate_preferences (%s judge): %s", judge, metrics)
    return out, scalars(metrics)


def judge_with_gold(samples: pd.DataFrame, groups: pd.DataFrame, gold_judge_model: ModelSource,
                    evaluation_params: dict[str, Any]) -> tuple[pd.DataFrame, MetricsPayload]:
    """Score every sample with the evaluation stage's gold judge (``evaluation.gold_judge``)."""
    p = EvaluationParams.parse(evaluation_params)
    judge = make_gold_judge(p.gold_judge, p.gold_judge_args, gold_judge_model.name_or_path)
    if judge is None:
        raise ValueError("generate_preferences.judge is 'gold' but evaluation.gold_judge is 'none'")
    return _write(groups, samples, judge(samples["completion"].tolist()), p.gold_judge)


def judge_with_reward_model(samples: pd.DataFrame, groups: pd.DataFrame,
                            reward_model: PretrainedHandle, tokenizer: PretrainedHandle,
                            params: dict[str, Any]) -> tuple[pd.DataFrame, MetricsPayload]:
    """Score every sample with the reward model (prompt tokens + completion tokens)."""
    p = GeneratePreferencesParams.parse(params)
    seqs = [list(a) + list(b) for a, b in zip(samples["prompt_ids"], samples["completion_ids"],
                                              strict=True)]
    scores = infer(RewardsJob(model_path=str(reward_model.path), device=p.device, precision=p.precision,
                              sequences=seqs,
                              response_starts=samples["prompt_ids"].map(len).tolist(),
                              batch_size=p.sampling.batch_size), p.num_processes, p.backend,
        lambda: reward_model.load(device=p.device))
    return _write(groups, samples, ensemble_reward(scores)[0], "reward_model")
