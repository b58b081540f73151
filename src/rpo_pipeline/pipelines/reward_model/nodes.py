"""reward_model nodes: train (cached by fingerprint) and score every train/val response."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rpo_pipeline.datasets import PretrainedHandle
from rpo_pipeline.fingerprint import CacheHit, Fingerprinted, fingerprint, result_params
from rpo_pipeline.jobs import InferenceJob, RewardModelJob, Split, fit, infer
from rpo_pipeline.mlflow_models import REWARD_MODEL, ModelBundle, causal_lm_dir, text_format
from rpo_pipeline.params import DataProcessingParams, RewardModelParams
from rpo_pipeline.precision import resolve_precision
from rpo_pipeline.reward_model import (
    CONFIG_FILE,
    RewardModel,
    RewardModelConfig,
    load_backbone,
    weight_bytes,
)
from rpo_pipeline.tracking import PRECISION_BITS, MetricsPayload, histories, scalars
from rpo_pipeline.training import resolve_device

log = logging.getLogger(__name__)
RM_VERSION = 1


def _backbone_path(choice: str, sft: PretrainedHandle, base: PretrainedHandle) -> str:
    """sft | base | a ``models:/`` URI of a registered model (downloaded) | a path or Hub id."""
    return {"sft": str(sft.path), "base": str(base.path)}.get(choice, None) or causal_lm_dir(choice)


def pair_items(tokenized: pd.DataFrame, pairs: pd.DataFrame, split: str,
               margin_column: str | None = None) -> tuple[list[tuple], list[int], pd.DataFrame]:
    """(chosen_ids, rejected_ids, margin) per pair of ``split``, their lengths, and the rows."""
    ids = tokenized[["group_id", "response_index", "input_ids"]]
    p = pairs[pairs["split"] == split]
    p = p.merge(ids.rename(columns={"response_index": "chosen_index", "input_ids": "chosen_ids"}),
                on=["group_id", "chosen_index"])
    p = p.merge(ids.rename(columns={"response_index": "rejected_index",
                                    "input_ids": "rejected_ids"}),
                on=["group_id", "rejected_index"]).reset_index(drop=True)
    if margin_column is None:
        margins = np.zeros(len(p))
    elif margin_column == "score_difference":
        margins = (p["score_chosen"] - p["score_rejected"]).to_numpy(dtype=float)
    else:
        margins = p[margin_column].to_numpy(dtype=float)
    bad = ~np.isfinite(margins)
    if bad.any():  # before any model loads: the data has no scores for these pairs
        raise ValueError(f"reward_model.margin_column {margin_column!r}: {int(bad.sum())} of {len(p)} "
                         f"{split} pairs have no finite value (e.g. group {p.loc[bad, 'group_id'].iloc[0]}); "
                         "the data has no scores there: set margin_column: null")
    items = list(zip(p["chosen_ids"], p["rejected_ids"], margins, strict=True))
    lengths = [max(len(c), len(r)) for c, r, _ in items]
    return items, lengths, p


def train_reward_model(sft_model: PretrainedHandle, base_model: PretrainedHandle,
                       tokenizer: PretrainedHandle, tokenized: pd.DataFrame, pairs: pd.DataFrame,
                       stored_fingerprint: str | None, params: dict[str, Any]
                       ) -> tuple[Fingerprinted | CacheHit, MetricsPayload]:
    """Bradley–Terry training of LoRA + head on the 4-bit backbone; val/test pair accuracy."""
    t0 = time.perf_counter()
    p = RewardModelParams.parse(params)
    backbone = _backbone_path(p.backbone, sft_model, base_model)
    items, lengths, _ = pair_items(tokenized, pairs, "train", p.margin_column)
    fp = fingerprint("reward_model", RM_VERSION, Path(backbone), Path(tokenizer.path),
                     pd.DataFrame({"c": [i[0] for i in items], "r": [i[1] for i in items],
                                   "m": [i[2] for i in items]}),
                     result_params(p.model_dump(exclude={"score"})),
                     resolve_precision(p.train.precision, resolve_device(p.device)))
    if fp == stored_fingerprint:
        seconds = time.perf_counter() - t0
        log.info("reward model cache hit (%s): %.3f s", fp[:12], seconds)
        return CacheHit(fp), scalars({"cache_hit": 1, "seconds": seconds})

    config = RewardModelConfig(backbone_path=backbone, load_in_4bit=p.load_in_4bit,
                               compute_dtype=p.compute_dtype, head_input=p.head_input,
                               lora_r=p.lora.r, lora_alpha=p.lora.alpha, lora_dropout=p.lora.dropout,
                               target_modules=p.lora.target_modules)
    evals = {}
    for split in ("val", "test"):
        s_items, s_lengths, _ = pair_items(tokenized, pairs, split, p.margin_column)
        evals[split] = Split(s_items, s_lengths)
    job = RewardModelJob(config, tokenizer.load().pad_token_id, p.model_dump(),
                         Split(items, lengths), evals)
    t = p.train
    model, result, ev = fit("reward_model", job, t.num_processes, t.backend, p.device,
                            lambda: RewardModel.for_training(config, seed=t.seed, device=p.device),
                            RewardModel.from_pretrained)
    metrics: dict[str, float] = {"cache_hit": 0, "pairs_per_second": result.items_per_second,
                                 **ev, "world_size": t.num_processes,
                                 "precision_bits": PRECISION_BITS[result.precision]}
    head = weight_bytes(model.head)
    metrics["weight_bytes"] = load_backbone(backbone, config.load_in_4bit,
                                            config.compute_dtype).get_memory_footprint() + head
    metrics["weight_bytes_full_precision"] = load_backbone(
        backbone, load_in_4bit=False).get_memory_footprint() + head
    metrics["seconds"] = time.perf_counter() - t0
    log.info("reward model: %d steps on %d process(es) in %.1f s, val accuracy %.3f, test "
             "accuracy %.3f, weights %.2f MB (%.2f of full precision)", t.steps, t.num_processes,
             result.seconds,
             metrics.get("val_accuracy", float("nan")), metrics.get("test_accuracy", float("nan")),
             metrics["weight_bytes"] / 1e6,
             metrics["weight_bytes"] / metrics["weight_bytes_full_precision"])
    hist = histories({k: result.history[k] for k in ("loss", "accuracy", "margin")},
                     result.log_steps) | scalars(metrics)
    model.training_history = hist  # saved with the adapter for the evaluation plots
    return Fingerprinted(model, fp), hist


def score_responses_with_reward_model(reward_model: PretrainedHandle, tokenizer: PretrainedHandle,
                                      tokenized: pd.DataFrame, stored_fingerprint: str | None,
                                      params: dict[str, Any]
                                      ) -> tuple[Fingerprinted | CacheHit, MetricsPayload]:
    """Reward of every train/val response (a fresh 4-bit copy, no grad), cached by fingerprint."""
    t0 = time.perf_counter()
    p = RewardModelParams.parse(params)
    rows = tokenized[tokenized["split"].isin(["train", "val"])].reset_index(drop=True)
    precision = resolve_precision(p.score.precision, resolve_device(p.device))
    fp = fingerprint("reward_scores", RM_VERSION, reward_model.content_hash(),
                     rows[["group_id", "response_index", "input_ids"]], precision)
    if fp == stored_fingerprint:
        seconds = time.perf_counter() - t0
        log.info("reward score cache hit (%s): %.3f s", fp[:12], seconds)
        return CacheHit(fp), scalars({"score_cache_hit": 1, "score_seconds": seconds})
    job = InferenceJob("rewards", str(reward_model.path), p.device, {
        "sequences": rows["input_ids"].tolist(), "response_starts": rows["response_start"].tolist(),
        "pad_id": tokenizer.load().pad_token_id, "batch_size": p.score.batch_size},
        precision=precision)
    rewards = infer(job, p.score.num_processes, p.score.backend,
                    lambda: reward_model.load(device=p.device))
    table = rows[["group_id", "response_index", "split"]].assign(reward=rewards)
    seconds = time.perf_counter() - t0
    log.info("reward scores: %d responses in %.1f s", len(table), seconds)
    return Fingerprinted(table, fp), scalars({"score_cache_hit": 0, "score_seconds": seconds,
                                              "scores_per_second": len(table) / seconds,
                                              "score_world_size": p.score.num_processes,
                                              "score_precision_bits": PRECISION_BITS[precision]})


def reward_normalization(scores: pd.DataFrame) -> tuple[dict[str, float], MetricsPayload]:
    """Mean and standard deviation of the rewards of the train split (for z-scoring in RPO)."""
    train_r = scores.loc[scores["split"] == "train", "reward"]
    stats = {"mean": float(train_r.mean()), "std": float(train_r.std(ddof=0)),
             "count": int(len(train_r))}
    return stats, scalars({"reward_train_mean": stats["mean"], "reward_train_std": stats["std"]})


def package_reward_model(reward_model: PretrainedHandle, tokenizer: PretrainedHandle,
                         data_params: dict[str, Any], params: dict[str, Any]) -> ModelBundle:
    """The reward model as an MLflow Model (``rpo_pipeline.mlflow_models``): adapter + head, the
    full-precision backbone it quantizes on load (when that is a local directory), the tokenizer
    and the prompt template; its registered version is tagged with its val/test pair accuracy."""
    p = RewardModelParams.parse(params)
    backbone = json.loads((reward_model.path / CONFIG_FILE).read_text())["backbone_path"]
    artifacts = {"reward_model": str(reward_model.path), "tokenizer": str(tokenizer.path)}
    if Path(backbone).is_dir():
        artifacts["backbone"] = backbone
    history = reward_model.training_history()
    tags = {f"reward_model.{k}": f"{history[k][-1]['value']:.6g}"
            for k in ("val_accuracy", "test_accuracy", "val_loss") if history.get(k)}
    return ModelBundle(REWARD_MODEL, artifacts,
                       {"text_format": text_format(DataProcessingParams.parse(data_params)),
                        "batch_size": p.score.batch_size, "device": p.device,
                        "example_response": "was a delight from start to finish."}, tags)
