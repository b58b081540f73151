"""data_processing nodes: thin wrappers over ``preference_groups``, ``text_format`` and friends."""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from rpo_pipeline.base_model import make_base_model, max_positions
from rpo_pipeline.datasets import ModelSource, PretrainedHandle
from rpo_pipeline.params import BaseModelParams, DataProcessingParams
from rpo_pipeline.preference_groups import SPLITS, assign_splits, groups_to_pairs, ingest
from rpo_pipeline.text_format import (
    Template,
    format_groups,
    format_prompts,
    format_sft_targets,
    tokenize_examples,
)
from rpo_pipeline.text_format import tokenize_prompts as _tokenize_prompts
from rpo_pipeline.tracking import MetricsPayload, scalars

log = logging.getLogger(__name__)


def ingest_preferences(raw: pd.DataFrame, params: dict[str, Any]
                       ) -> tuple[pd.DataFrame, pd.DataFrame, MetricsPayload]:
    """Validate raw rows into canonical groups; dropped rows (``on_invalid: drop``) with reasons."""
    p = DataProcessingParams.parse(params)
    result = ingest(raw, fmt=p.format, on_invalid=p.on_invalid, columns=dict(p.columns),
                    prompt_words=tuple(p.prompt_words), seed=p.seed)
    counts = result.counts
    log.info("format %s: %d rows in, %d out, %d dropped", result.format, counts["rows_in"],
             counts["rows_out"], counts["rows_dropped"])
    if len(result.dropped):
        log.warning("dropped %d invalid rows; reasons: %s", len(result.dropped),
                    result.dropped["reason"].str.replace(r"row \d+", "row N", regex=True)
                    .value_counts().head(5).to_dict())
    return result.groups, result.dropped, scalars(counts)


def split_by_prompt(groups: pd.DataFrame, params: dict[str, Any]) -> pd.DataFrame:
    """Assign train / val / test by a seeded hash of the prompt text."""
    p = DataProcessingParams.parse(params)
    return assign_splits(groups, p.split.model_dump(), p.seed)


def make_pairs(groups: pd.DataFrame, params: dict[str, Any]) -> pd.DataFrame:
    """One (chosen, rejected) pair per group: best vs worst or vs a seeded random other."""
    p = DataProcessingParams.parse(params)
    return groups_to_pairs(groups, rejected=p.rejected, seed=p.seed)


def resolve_model_source(name_or_path: str | None) -> dict[str, str | None]:
    """A parameter that names a model (null: none), handed to its ``ModelSourceDataset``, which
    resolves it (a registered ``models:/`` URI pinned to a version and downloaded, a Hub id to its
    revision)."""
    return {"name_or_path": name_or_path}


def build_base_model(groups: pd.DataFrame, source: ModelSource, base_params: dict[str, Any],
                     params: dict[str, Any]) -> tuple[Any, Any]:
    """Base causal LM and tokenizer (a pretrained one from ``source``, ``base_model.name_or_path``
    resolved); the builtin tokenizer is trained on the train split's text."""
    base, p = BaseModelParams.parse(base_params), DataProcessingParams.parse(params)
    train = groups[groups["split"] == "train"]
    template_words = Template.parse(p.template).prefix.replace("{prompt}", " ")

    targets = train["sft_target"] if "sft_target" in train.columns else [None] * len(train)

    def texts():
        for prompt, responses, target in zip(train["prompt"], train["responses"], targets,
                                             strict=True):
            yield f"{template_words} {prompt}"
            yield from responses
            if target is not None:
                yield target

    model, tokenizer = make_base_model(base, texts(), source.name_or_path)
    limit = max_positions(model)
    if limit is not None and p.max_length > limit:
        raise ValueError(f"data_processing.max_length = {p.max_length} exceeds the {limit} positions of "
                         f"{base.name_or_path}; lower it to at most {limit}")
    log.info("base model %s: %.2f M parameters, vocab %d", base.name_or_path,
             model.num_parameters() / 1e6, len(tokenizer))
    return model, tokenizer


def format_responses(groups: pd.DataFrame, tokenizer: PretrainedHandle, params: dict[str, Any]
                     ) -> pd.DataFrame:
    """Prompt and response text of every response, with the template or the chat template."""
    p = DataProcessingParams.parse(params)
    return format_groups(groups, template=p.template, use_chat_template=p.use_chat_template,
                         tokenizer=tokenizer.load())


def tokenize_responses(examples: pd.DataFrame, tokenizer: PretrainedHandle, params: dict[str, Any]
                       ) -> pd.DataFrame:
    """Token ids with the response start index; prompts keep their end, responses their start."""
    p = DataProcessingParams.parse(params)
    return tokenize_examples(examples, tokenizer.load(), p.max_prompt_length, p.max_length,
                             chat_template=p.use_chat_template)


def tokenize_prompts(groups: pd.DataFrame, tokenizer: PretrainedHandle, params: dict[str, Any]
                     ) -> pd.DataFrame:
    """Prompt token ids of every group, responses or not (sampling and evaluation start here)."""
    p = DataProcessingParams.parse(params)
    tok = tokenizer.load()
    prompts = format_prompts(groups, template=p.template, use_chat_template=p.use_chat_template,
                             tokenizer=tok)
    return _tokenize_prompts(prompts, tok, p.max_prompt_length, chat_template=p.use_chat_template)


def tokenize_sft_targets(groups: pd.DataFrame, tokenizer: PretrainedHandle, params: dict[str, Any]
                         ) -> pd.DataFrame:
    """Token ids of each ``text`` group's continuation (response_index -1), for SFT only."""
    p = DataProcessingParams.parse(params)
    tok = tokenizer.load()
    examples = format_sft_targets(groups, template=p.template,
                                  use_chat_template=p.use_chat_template, tokenizer=tok)
    return tokenize_examples(examples, tok, p.max_prompt_length, p.max_length,
                             chat_template=p.use_chat_template)


def summarize(groups: pd.DataFrame, pairs: pd.DataFrame, tokenized: pd.DataFrame
              ) -> MetricsPayload:
    """Counts per split, pairs, truncation and lengths for MLflow."""
    m: dict[str, float] = {}
    for s in SPLITS:
        m[f"groups_{s}"] = int((groups["split"] == s).sum())
        m[f"pairs_{s}"] = int((pairs["split"] == s).sum()) if len(pairs) else 0
    m["groups_without_preference"] = len(groups) - len(pairs)
    m["groups_without_responses"] = int((groups["responses"].map(len) == 0).sum())
    m["examples"] = len(tokenized)
    m["prompt_truncated"] = int(tokenized["prompt_truncated"].sum())
    m["response_truncated"] = int(tokenized["response_truncated"].sum())
    if len(tokenized):  # prompt-only and text data have no response rows
        m["tokens_mean"] = float(tokenized["length"].mean())
        m["tokens_max"] = int(tokenized["length"].max())
    log.info("data_processing summary: %s", m)
    return scalars(m)
