"""reward_model nodes: train (cached by fingerprint) and score every train/val response."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from rpo_pipeline.datasets import ModelSource, PretrainedHandle
from rpo_pipeline.fingerprint import (
    CachedStage,
    CacheHit,
    Fingerprinted,
    fingerprint,
    model_source,
    result_params,
)
from rpo_pipeline.jobs import RewardModelJob, RewardsJob, Split, fit, infer
from rpo_pipeline.mlflow_models import REWARD_MODEL, ModelBundle, data_example, text_format
from rpo_pipeline.params import DataProcessingParams, RewardModelParams
from rpo_pipeline.precision import resolve_precision
from rpo_pipeline.reward_model import (
    RewardModel,
    RewardModelConfig,
    ensemble_reward,
    load_backbone,
    reward_pair_items,
    training_items,
    training_pairs,
    weight_bytes,
    with_bootstrap,
)
from rpo_pipeline.tracking import PRECISION_BITS, MetricsPayload, histories, scalars
from rpo_pipeline.training import resolve_device

log = logging.getLogger(__name__)
RM_VERSION = 2  # 2: ensemble members train one after another


def _backbone_path(source: ModelSource, sft: PretrainedHandle, base: PretrainedHandle) -> str:
    """sft | base | what ``reward_model.backbone`` resolved to (a registered model's local copy,
    a path or a Hub id)."""
    return {"sft": str(sft.path), "base": str(base.path)}.get(source.requested) or source.name_or_path


def train_reward_model(sft_model: PretrainedHandle, base_model: PretrainedHandle, backbone: ModelSource,
                       tokenizer: PretrainedHandle, tokenized: pd.DataFrame, pairs: pd.DataFrame,
                       groups: pd.DataFrame, stored_fingerprint: str | None, params: dict[str, Any]
                       ) -> tuple[Fingerprinted | CacheHit, Fingerprinted | CacheHit, MetricsPayload]:
    """Bradley–Terry training of LoRA + head on the 4-bit backbone; val/test pair accuracy.

    Returns the model, its training history (``reward_model.training_history``, for the
    evaluation plots and the registered model's tags) and the metrics. Both are kept untouched
    when backbone, tokenizer, train pairs and parameters are unchanged
    (``reward_model.cache_hit``).
    """
    stage = CachedStage("reward model", seconds_key="seconds")
    p = RewardModelParams.parse(params)
    backbone = _backbone_path(backbone, sft_model, base_model)
    items, lengths = training_items(tokenized, pairs, groups, p.comparisons, p.margin_column)
    train_pairs = training_pairs(pairs, groups, p.comparisons)
    train_rows = tokenized.loc[tokenized["split"] == "train", ["group_id", "response_index", "input_ids"]]
    fp = fingerprint("reward_model", RM_VERSION, model_source(backbone), Path(tokenizer.path),
                     train_pairs[train_pairs["split"] == "train"], train_rows,
                     result_params(p.model_dump(exclude={"score": True,
                                                         "ensemble": {"aggregate", "penalty"}})),
                     resolve_precision(p.train.precision, resolve_device(p.device)))
    if (hit := stage.reuse(fp, stored_fingerprint)) is not None:
        cache_hit, metrics = hit
        return cache_hit, cache_hit, metrics  # the model and its history are one cache entry

    if p.ensemble.members > 1 and p.ensemble.bootstrap:
        items = with_bootstrap(items, p.ensemble.members, p.train.seed)
    config = RewardModelConfig(backbone_path=backbone, load_in_4bit=p.load_in_4bit,
                               compute_dtype=p.compute_dtype, head_input=p.head_input,
                               pooling=p.pooling, members=p.ensemble.members,
                               finetune=p.finetune, lora_r=p.lora.r, lora_alpha=p.lora.alpha,
                               lora_dropout=p.lora.dropout, target_modules=p.lora.target_modules)
    evals = {split: Split(*reward_pair_items(tokenized, pairs, split, p.margin_column))
             for split in ("val", "test")}
    job = RewardModelJob(config=config, params=p, train=Split(items, lengths), evals=evals)
    t = p.train
    model, result, ev = fit(job, t.num_processes, t.backend, p.device,
                            lambda: RewardModel.for_training(config, seed=t.seed, device=p.device),
                            RewardModel.from_pretrained)
    metrics: dict[str, float] = {"pairs_per_second": result.items_per_second,
                                 "train_pairs": len(items),
                                 **ev, "world_size": t.num_processes,
                                 "precision_bits": PRECISION_BITS[result.precision]}
    head = weight_bytes(model.head)
    metrics["weight_bytes"] = load_backbone(backbone, config.load_in_4bit,
                                            config.compute_dtype).get_memory_footprint() + head
    metrics["weight_bytes_full_precision"] = load_backbone(
        backbone, load_in_4bit=False).get_memory_footprint() + head
    log.info("reward model: %d steps on %d process(es) in %.1f s, val accuracy %.3f, test "
             "accuracy %.3f, weights %.2f MB (%.2f of full precision)", t.steps, t.num_processes,
             result.seconds,
             metrics.get("val_accuracy", float("nan")), metrics.get("test_accuracy", float("nan")),
             metrics["weight_bytes"] / 1e6,
             metrics["weight_bytes"] / metrics["weight_bytes_full_precision"])
    hist = histories({k: result.history[k] for k in ("loss", "accuracy", "margin")},
                     result.log_steps) | stage.computed(metrics)
    return Fingerprinted(model, fp), Fingerprinted(hist, fp), hist


def score_responses_with_reward_model(reward_model: PretrainedHandle, tokenizer: PretrainedHandle,
                                      tokenized: pd.DataFrame, stored_fingerprint: str | None,
                                      params: dict[str, Any]
                                      ) -> tuple[Fingerprinted | CacheHit, MetricsPayload]:
    """Reward of every train/val response (a fresh 4-bit copy, no grad), cached by fingerprint.

    ``reward`` is what rpo trains on (``ensemble.aggregate`` of the members' rewards),
    ``reward_std`` the members' spread (0 for one model)."""
    stage = CachedStage("reward score", hit_key="score_cache_hit", seconds_key="score_seconds")
    p = RewardModelParams.parse(params)
    rows = tokenized[tokenized["split"].isin(["train", "val"])].reset_index(drop=True)
    precision = resolve_precision(p.score.precision, resolve_device(p.device))
    fp = fingerprint("reward_scores", RM_VERSION, reward_model.content_hash(),
                     rows[["group_id", "response_index", "input_ids"]], precision,
                     p.ensemble.aggregate, p.ensemble.penalty)
    if (hit := stage.reuse(fp, stored_fingerprint)) is not None:
        return hit
    job = RewardsJob(model_path=str(reward_model.path), device=p.device, precision=precision,
                     sequences=rows["input_ids"].tolist(),
                     response_starts=rows["response_start"].tolist(), batch_size=p.score.batch_size)
    members = infer(job, p.score.num_processes, p.score.backend,
                    lambda: reward_model.load(device=p.device))
    reward, std = ensemble_reward(members, p.ensemble.aggregate, p.ensemble.penalty)
    table = rows[["group_id", "response_index", "split"]].assign(reward=reward, reward_std=std)
    seconds = stage.seconds()
    log.info("reward scores: %d responses in %.1f s", len(table), seconds)
    return Fingerprinted(table, fp), stage.computed({
        "scores_per_second": len(table) / seconds, "score_world_size": p.score.num_processes,
        "score_precision_bits": PRECISION_BITS[precision]})


def reward_normalization(scores: pd.DataFrame) -> tuple[dict[str, float], MetricsPayload]:
    """Mean and standard deviation of the rewards of the train split (for z-scoring in RPO)."""
    train_r = scores.loc[scores["split"] == "train", "reward"]
    stats = {"mean": float(train_r.mean()), "std": float(train_r.std(ddof=0)),
             "count": int(len(train_r))}
    return stats, scalars({"reward_train_mean": stats["mean"], "reward_train_std": stats["std"]})


def package_reward_model(reward_model: PretrainedHandle, backbone_source: ModelSource,
                         sft_model: PretrainedHandle, base_model: PretrainedHandle,
                         tokenizer: PretrainedHandle, groups: pd.DataFrame, history: MetricsPayload,
                         data_params: dict[str, Any], params: dict[str, Any]) -> ModelBundle:
    """The reward model as an MLflow Model (``rpo_pipeline.mlflow_models``): adapter + head, the
    full-precision backbone it quantizes on load (when that is a local directory), the tokenizer,
    the prompt template and an input example from the data; its registered version is tagged with
    its val/test pair accuracy."""
    p = RewardModelParams.parse(params)
    backbone = _backbone_path(backbone_source, sft_model, base_model)
    artifacts = {"reward_model": str(reward_model.path), "tokenizer": str(tokenizer.path)}
    if Path(backbone).is_dir():
        artifacts["backbone"] = backbone
    tags = {f"reward_model.{k}": f"{history[k][-1]['value']:.6g}"
            for k in ("val_accuracy", "test_accuracy", "val_loss") if history.get(k)}
    return ModelBundle(REWARD_MODEL, artifacts,
                       {"text_format": text_format(DataProcessingParams.parse(data_params)),
                        "batch_size": p.score.batch_size, "device": p.device, **data_example(groups)},
                       tags)
