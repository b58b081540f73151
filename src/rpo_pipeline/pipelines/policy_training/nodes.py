"""policy_training nodes: DPO and RPO share one runner over the one training loop.

π_ref is never loaded: its log-probs come from the ``reference_logprobs`` cache. The policy starts
from π_SFT's weights (full fine-tuning, or LoRA merged at the end); evaluation on the val split
every ``train.eval_every`` steps (``eval_`` metrics); checkpoints in ``train.checkpoint_dir``
(``train.resume: true`` continues from there).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pandas as pd
import torch
from peft import LoraConfig, get_peft_model

from rpo_pipeline.base_model import lora_target_modules
from rpo_pipeline.datasets import PretrainedHandle
from rpo_pipeline.losses import preference_loss, reward_aware_loss
from rpo_pipeline.params import DpoParams, PolicyParams, RpoParams
from rpo_pipeline.policy import (
    group_collate,
    group_items,
    policy_collate,
    preference_items,
    reward_targets,
)
from rpo_pipeline.tracking import MetricsPayload, histories
from rpo_pipeline.training import TrainConfig, evaluate, train

log = logging.getLogger(__name__)


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off (as TRL's ``disable_dropout``): π's log-probs are then computed like the cached
    π_ref's, in eval mode, so the implicit reward starts at exactly 0 and its gradient is not noise."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def _run(sft_model: PretrainedHandle, items: list, lengths: list[int], collate: Callable,
         loss_fn: Callable, eval_fn: Callable | None, p: PolicyParams
         ) -> tuple[Any, MetricsPayload]:
    """Load π_SFT (+ LoRA), train, merge; metrics with TRL names, ``eval_`` at eval steps."""
    cfg = TrainConfig(**p.train.model_dump(), device=p.device)
    model = sft_model.load()
    if p.disable_dropout:
        disable_dropout(model)
    lora = p.lora
    if lora.enabled:
        targets = lora_target_modules(model, lora.target_modules, f"{p.name}.lora.target_modules")
        model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha,
                                                 lora_dropout=lora.dropout, target_modules=targets))
    result = train(model, items, lengths, collate, loss_fn, cfg, desc=p.name, eval_fn=eval_fn)
    if lora.enabled:
        model = model.merge_and_unload()
    hist = dict(result.history)
    eval_steps = [int(s) for s in hist.pop("eval_step", [])]
    hist["pairs_per_second"] = hist.pop("items_per_second")
    train_part = {k: v for k, v in hist.items() if not k.startswith("eval_")}
    eval_part = {k: v for k, v in hist.items() if k.startswith("eval_")}
    log.info("%s: %d steps in %.1f s (%.1f items/s); eval reward accuracy %.3f", p.name, cfg.steps,
             result.seconds, result.items_per_second,
             eval_part.get("eval_rewards/accuracies", [float("nan")])[-1])
    metrics = histories(train_part, result.log_steps) | histories(eval_part, eval_steps)
    model = model.cpu()
    model.training_history = metrics  # saved with the policy for the evaluation plots
    return model, metrics


def train_policy(sft_model: PretrainedHandle, tokenizer: PretrainedHandle, tokenized: pd.DataFrame,
                 pairs: pd.DataFrame, reference: pd.DataFrame, params: dict[str, Any]
                 ) -> tuple[Any, MetricsPayload]:
    """DPO family: train on (chosen, rejected) pairs with the configured loss."""
    p = DpoParams.parse(params)
    loss_fn = preference_loss(p.loss, p.beta, p.label_smoothing, p.sft_weight)
    items, lengths = preference_items(tokenized, pairs, reference, "train")
    val_items, val_len = preference_items(tokenized, pairs, reference, "val")
    collate = policy_collate(tokenizer.load().pad_token_id)
    batch = 2 * p.train.batch_size

    def eval_fn(m):
        return evaluate(m, val_items, val_len, collate, loss_fn, batch, p.device)

    return _run(sft_model, items, lengths, collate, loss_fn, eval_fn if val_items else None, p)


def train_rpo_policy(sft_model: PretrainedHandle, tokenizer: PretrainedHandle,
                     tokenized: pd.DataFrame, pairs: pd.DataFrame, reference: pd.DataFrame,
                     groups: pd.DataFrame, reward_scores: pd.DataFrame, reward_stats: dict,
                     params: dict[str, Any]) -> tuple[Any, MetricsPayload]:
    """RPO: match the policy's implicit reward margins to the reward model's over K responses.

    Evaluation reports the RPO loss and target metrics on val groups, and ``rewards/*`` on the val
    pairs ranked by the data's gold scores (the gold judge on the default data).
    """
    p = RpoParams.parse(params)
    loss_fn = reward_aware_loss(p.distance, p.beta, p.eta, p.average_logps, p.sft_weight)
    targets = reward_targets(groups, reward_scores, reward_stats, p.reward_source,
                             p.reward_normalization)
    items, lengths = group_items(tokenized, reference, targets, "train")
    val_items, val_len = group_items(tokenized, reference, targets, "val")
    gold_pairs, gold_len = preference_items(tokenized, pairs, reference, "val")
    pad = tokenizer.load().pad_token_id
    collate, pair_collate_fn = group_collate(pad), policy_collate(pad)
    pair_metrics = preference_loss("sigmoid", p.beta)
    batch = p.train.batch_size

    def eval_fn(m):
        out = evaluate(m, val_items, val_len, collate, loss_fn, 2 * batch, p.device)
        gold = evaluate(m, gold_pairs, gold_len, pair_collate_fn, pair_metrics, 4 * batch, p.device)
        return out | {k: v for k, v in gold.items() if k.startswith(("rewards/", "logps/"))}

    return _run(sft_model, items, lengths, collate, loss_fn, eval_fn if val_items else None, p)
