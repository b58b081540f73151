"""policy_training nodes: DPO and RPO share one runner over the one training loop.

π_ref is never loaded: its log-probs come from the ``reference_logprobs`` cache. The policy starts
from π_SFT's weights (full fine-tuning, or LoRA merged at the end); evaluation on the val split
every ``train.eval_every`` steps (``eval_`` metrics); checkpoints every ``train.checkpoint_every``
steps in the catalog's ``<method>.checkpoints`` (``train.resume: true`` continues from there, only
the run that wrote them). With ``train.num_processes > 1`` the training runs data parallel on that
many worker processes (``jobs.fit``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pandas as pd
from transformers import AutoModelForCausalLM

from rpo_pipeline.datasets import CheckpointDir, PretrainedHandle
from rpo_pipeline.evaluation import curve_steps
from rpo_pipeline.jobs import DpoJob, RpoJob, Split, fit
from rpo_pipeline.params import DpoParams, EvaluationParams, PolicyParams, RpoParams
from rpo_pipeline.policy import group_items, preference_items, reward_targets
from rpo_pipeline.tracking import PRECISION_BITS, MetricsPayload, histories, scalars

log = logging.getLogger(__name__)
TrainOutputs = tuple[Any, dict[str, Any], MetricsPayload, MetricsPayload]


def _curve_steps(p: PolicyParams, evaluation_params: dict[str, Any]) -> list[int]:
    return curve_steps(p.train.steps, EvaluationParams.parse(evaluation_params).curve.points)


def run_policy_job(start: PretrainedHandle, job: DpoJob, p: PolicyParams
                   ) -> tuple[Any, dict[str, Any], MetricsPayload, MetricsPayload]:
    """Train from ``start`` (here or on N workers): the model, its intermediate copies at
    ``job.snapshot_steps`` (by step, as text), its training history (metrics with TRL names,
    ``eval_`` at eval steps; ``<method>.training_history``) and the metrics to log."""
    t = p.train
    model, result, _ = fit(job, t.num_processes, t.backend, p.device, start.load,
                           AutoModelForCausalLM.from_pretrained)
    hist = dict(result.history)
    eval_steps = [int(s) for s in hist.pop("eval_step", [])]
    hist["pairs_per_second"] = hist.pop("items_per_second")  # all processes together
    train_part = {k: v for k, v in hist.items() if not k.startswith("eval_")}
    eval_part = {k: v for k, v in hist.items() if k.startswith("eval_")}
    log.info("%s: %d steps on %d process(es) in %.1f s (%.1f items/s); eval reward accuracy %.3f",
             job.method, t.steps, t.num_processes, result.seconds, result.items_per_second,
             eval_part.get("eval_rewards/accuracies", [float("nan")])[-1])
    history = histories(train_part, result.log_steps) | histories(eval_part, eval_steps)
    snapshots = {str(step): m for step, m in sorted(result.snapshots.items())}
    return model, snapshots, history, history | scalars({
        "world_size": t.num_processes, "precision_bits": PRECISION_BITS[result.precision]})


def train_dpo_policy(sft_model: PretrainedHandle, tokenizer: PretrainedHandle,
                     tokenized: pd.DataFrame, pairs: pd.DataFrame, reference: pd.DataFrame,
                     checkpoints: CheckpointDir, params: dict[str, Any],
                     evaluation_params: dict[str, Any]) -> TrainOutputs:
    """DPO family: train on (chosen, rejected) pairs with the configured loss. Keeps
    ``evaluation.curve.points`` − 1 intermediate policies, evenly spaced in steps, for the
    over-optimisation curves (the last point is the policy itself)."""
    p = DpoParams.parse(params)
    job = DpoJob(model_path=str(sft_model.path), params=p,
                 train=Split(*preference_items(tokenized, pairs, reference, "train")),
                 val=Split(*preference_items(tokenized, pairs, reference, "val")),
                 checkpoint_dir=str(checkpoints.path), snapshot_steps=_curve_steps(p, evaluation_params))
    return run_policy_job(sft_model, job, p)


def train_rpo_policy(sft_model: PretrainedHandle, tokenizer: PretrainedHandle,
                     tokenized: pd.DataFrame, pairs: pd.DataFrame, reference: pd.DataFrame,
                     groups: pd.DataFrame, reward_scores: pd.DataFrame, reward_stats: dict,
                     checkpoints: CheckpointDir, params: dict[str, Any],
                     evaluation_params: dict[str, Any]) -> TrainOutputs:
    """RPO: match the policy's implicit reward margins to the reward model's over K responses.

    Evaluation reports the RPO loss and target metrics on val groups, and ``rewards/*`` on the val
    pairs ranked by the data's gold scores (the gold judge on the default data).
    """
    p = RpoParams.parse(params)
    targets = reward_targets(groups, reward_scores, reward_stats, p.reward_source,
                             p.reward_normalization)
    job = RpoJob(model_path=str(sft_model.path), params=p,
                 train=Split(*group_items(tokenized, reference, targets, "train")),
                 val=Split(*group_items(tokenized, reference, targets, "val")),
                 val_pairs=Split(*preference_items(tokenized, pairs, reference, "val")),
                 checkpoint_dir=str(checkpoints.path), snapshot_steps=_curve_steps(p, evaluation_params))
    return run_policy_job(sft_model, job, p)


# What each method's node reads besides the shared inputs (its parameters are ``params:<method>``).
TRAINERS: dict[str, tuple[Callable[..., TrainOutputs], list[str]]] = {
    "dpo": (train_dpo_policy, []),
    "rpo": (train_rpo_policy, ["preference_groups", "reward_scores", "reward_stats"]),
}
