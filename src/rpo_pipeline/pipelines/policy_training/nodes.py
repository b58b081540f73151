"""policy_training node: preference training of the policy from π_SFT with cached reference log-probs."""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd
from peft import LoraConfig, get_peft_model

from rpo_pipeline.datasets import PretrainedHandle
from rpo_pipeline.losses import preference_loss
from rpo_pipeline.policy import policy_collate, preference_items
from rpo_pipeline.tracking import MetricsPayload, histories
from rpo_pipeline.training import TrainConfig, evaluate, train

log = logging.getLogger(__name__)


def train_policy(sft_model: PretrainedHandle, tokenizer: PretrainedHandle, tokenized: pd.DataFrame,
                 pairs: pd.DataFrame, reference: pd.DataFrame, params: dict[str, Any]
                 ) -> tuple[Any, MetricsPayload]:
    """Train the policy, starting from π_SFT's weights, with the configured preference loss.

    π_ref is never loaded: its log-probs come from the ``reference_logprobs`` cache. Evaluates on
    the val pairs every ``train.eval_every`` steps (``eval_`` metrics) and checkpoints to
    ``train.checkpoint_dir`` (``train.resume: true`` continues from there).
    """
    loss_fn = preference_loss(params["loss"], params["beta"], params.get("label_smoothing", 0.0),
                              params.get("sft_weight", 0.0))  # unknown names fail here, first
    train_items, train_len = preference_items(tokenized, pairs, reference, "train")
    val_items, val_len = preference_items(tokenized, pairs, reference, "val")
    cfg = TrainConfig.from_params(params["train"], device=params["device"])
    collate = policy_collate(tokenizer.load().pad_token_id)

    model = sft_model.load()
    lora = params.get("lora") or {}
    if lora.get("enabled"):
        model = get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"],
                                                 lora_dropout=lora.get("dropout", 0.0),
                                                 target_modules=list(lora["target_modules"])))

    def eval_fn(m):
        return evaluate(m, val_items, val_len, collate, loss_fn, 2 * cfg.batch_size, params["device"])

    result = train(model, train_items, train_len, collate, loss_fn, cfg,
                   desc=params.get("name", "policy"), eval_fn=eval_fn if val_items else None)
    if lora.get("enabled"):
        model = model.merge_and_unload()
    hist = dict(result.history)
    eval_steps = [int(s) for s in hist.pop("eval_step", [])]
    hist["pairs_per_second"] = hist.pop("items_per_second")
    train_part = {k: v for k, v in hist.items() if not k.startswith("eval_")}
    eval_part = {k: v for k, v in hist.items() if k.startswith("eval_")}
    log.info("%s: %d steps in %.1f s (%.1f pairs/s); eval reward accuracy %.3f",
             params.get("name", "policy"), cfg.steps, result.seconds, result.items_per_second,
             eval_part.get("eval_rewards/accuracies", [float("nan")])[-1])
    return model.cpu(), histories(train_part, result.log_steps) | histories(eval_part, eval_steps)
