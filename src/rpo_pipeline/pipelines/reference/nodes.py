"""reference nodes: SFT (cached by fingerprint) and the reference log-prob cache."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd
from transformers import AutoModelForCausalLM

from rpo_pipeline.datasets import PretrainedHandle
from rpo_pipeline.fingerprint import CachedStage, CacheHit, Fingerprinted, fingerprint, result_params
from rpo_pipeline.jobs import ResponseLogpsJob, SftJob, Split, fit, infer
from rpo_pipeline.params import DataProcessingParams, ReferenceParams
from rpo_pipeline.precision import resolve_precision
from rpo_pipeline.reference import (
    LOGPROB_VERSION,
    reference_table,
    select_examples,
    sft_items,
)
from rpo_pipeline.tracking import PRECISION_BITS, MetricsPayload, histories
from rpo_pipeline.training import resolve_device

log = logging.getLogger(__name__)
SFT_VERSION = 1
_KEYED = ["group_id", "response_index", "input_ids", "response_start"]


def _sft_rows(tokenized: pd.DataFrame, sft_targets: pd.DataFrame, pairs: pd.DataFrame,
              split: str, responses: str) -> pd.DataFrame:
    """SFT examples of ``split``: the responses ``reference.sft.responses`` picks, then the
    continuations of ``text`` groups (``tokenized_sft_targets``)."""
    rows = select_examples(tokenized, pairs, [split], responses)
    targets = sft_targets[sft_targets["split"] == split]
    if targets.empty:
        return rows
    return pd.concat([rows, targets[rows.columns]], ignore_index=True)


def train_sft(base_model: PretrainedHandle, tokenizer: PretrainedHandle, tokenized: pd.DataFrame,
              sft_targets: pd.DataFrame, pairs: pd.DataFrame, stored_fingerprint: str | None,
              params: dict[str, Any]) -> tuple[Fingerprinted | CacheHit, MetricsPayload]:
    """Fine-tune the base model on the training responses and the continuations of ``text``
    groups (loss on response tokens only).

    Returns the stored model untouched when base model, tokenizer, training data and SFT parameters
    are unchanged (``reference.sft_cache_hit``). ``sft.steps: 0`` keeps the base model as π_ref.
    """
    stage = CachedStage("SFT", hit_key="sft_cache_hit", seconds_key="sft_seconds")
    p = ReferenceParams.parse(params)
    sft = p.sft
    device = resolve_device(p.device)
    train_rows = _sft_rows(tokenized, sft_targets, pairs, "train", sft.responses)
    if train_rows.empty and sft.steps > 0:
        raise ValueError("reference.sft.steps > 0 but the train split has no responses and no text "
                         "to fine-tune on")
    fp = fingerprint("sft", SFT_VERSION, Path(base_model.path), Path(tokenizer.path),
                     train_rows[_KEYED], result_params(sft.model_dump()), device.type,
                     resolve_precision(sft.precision, device))
    if (hit := stage.reuse(fp, stored_fingerprint)) is not None:
        return hit

    model = base_model.load()
    metrics: dict[str, float] = {}
    payload: MetricsPayload = {}
    if sft.steps > 0:
        val_rows = _sft_rows(tokenized, sft_targets, pairs, "val", sft.responses)
        if sft.patience and val_rows.empty:
            raise ValueError(f"reference.sft.patience is {sft.patience} but the val split has no "
                             "responses and no text: early stopping needs a val loss")
        job = SftJob(model_path=str(base_model.path), params=p, train=Split(*sft_items(train_rows)),
                     val=Split(*sft_items(val_rows)))
        model, result, val = fit(job, sft.num_processes, sft.backend, p.device, lambda: model,
                                 AutoModelForCausalLM.from_pretrained)
        payload = histories({"sft_loss": result.history["loss"]}, result.log_steps)
        if "eval_loss" in result.history:
            payload |= histories({"sft_eval_loss": result.history["eval_loss"]},
                                 [int(s) for s in result.history["eval_step"]])
        metrics |= {"sft_val_loss": val["val_loss"], "sft_train_loss": result.history["loss"][-1],
                    "sft_sequences_per_second": result.items_per_second,
                    "sft_world_size": sft.num_processes,
                    "sft_precision_bits": PRECISION_BITS[result.precision]}
        if sft.patience:
            metrics |= {"sft_steps": result.steps, "sft_best_step": result.best_step or 0}
        log.info("SFT: %d of %d steps (best val loss at step %s) on %d process(es) in %.1f s "
                 "(%.0f seq/s), train loss %.3f, val loss %.3f", result.steps, sft.steps,
                 result.best_step, sft.num_processes, result.seconds, result.items_per_second,
                 result.history["loss"][-1], val["val_loss"])
    model.cpu()
    return Fingerprinted(model, fp), payload | stage.computed(metrics)


def build_reference_cache(sft_model: PretrainedHandle, tokenizer: PretrainedHandle,
                          tokenized: pd.DataFrame, stored_fingerprint: str | None,
                          data_params: dict[str, Any], params: dict[str, Any]
                          ) -> tuple[Fingerprinted | CacheHit, MetricsPayload]:
    """Summed reference log-prob and token count of every train/val response, cached.

    The fingerprint covers the reference weights, the tokenizer, the template, the length limits
    and the tokenized data; on a match the stored table is kept and the model is never loaded.
    """
    stage = CachedStage("reference log-prob")
    p, data = ReferenceParams.parse(params), DataProcessingParams.parse(data_params)
    rows = tokenized[tokenized["split"].isin(["train", "val"])].reset_index(drop=True)
    formatting = data.model_dump(include={"template", "use_chat_template", "max_prompt_length",
                                          "max_length"})
    device = resolve_device(p.device)
    precision = resolve_precision(p.logprobs.precision, device)
    fp = fingerprint("reference_logprobs", LOGPROB_VERSION, sft_model.content_hash(),
                     Path(tokenizer.path), formatting, rows[_KEYED], device.type,
                     {"fp32": "float32"}.get(precision, precision))
    if (hit := stage.reuse(fp, stored_fingerprint)) is not None:
        return hit

    t1 = time.perf_counter()
    job = ResponseLogpsJob(model_path=str(sft_model.path), device=p.device, precision=precision,
                           input_ids=rows["input_ids"].tolist(),
                           response_starts=rows["response_start"].tolist(),
                           batch_size=p.logprobs.batch_size, progress=True)
    logp, n = infer(job, p.logprobs.num_processes, p.logprobs.backend, sft_model.load)
    compute = time.perf_counter() - t1
    table = reference_table(rows, logp, n)
    log.info("reference log-probs: %d sequences in %.1f s (%.0f seq/s)", len(rows), compute,
             len(rows) / compute)
    return Fingerprinted(table, fp), stage.computed({
        "cache_sequences": len(rows),
        "cache_sequences_per_second": len(rows) / compute,
        "cache_world_size": p.logprobs.num_processes,
        "cache_precision_bits": PRECISION_BITS[precision]})
