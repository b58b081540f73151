"""Online RPO data: each round's prompts, the policy's samples as groups, their targets.

Kedro-free. A round samples K responses per prompt from the current policy (``evaluation.generate``),
scores them with the reward model and under π_ref, and trains the reward-aware loss on them
(``policy.group_items``, ``losses.reward_aware_loss_fn``), starting from the previous round's policy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from rpo_pipeline.preference_groups import GROUP_COLUMNS, group_id

KEY = ["group_id", "response_index"]


def round_prompts(prompts: pd.DataFrame, round_index: int, per_round: int, seed: int
                  ) -> pd.DataFrame:
    """Round ``round_index``'s (1-based) slice of the train prompts: ``per_round`` groups taken in
    a seeded order, a fresh slice each round (wrapping around once every prompt was used).

    ``prompts`` is ``tokenized_prompts`` (group_id, split, prompt_ids); returns group_id and
    prompt_ids.
    """
    if round_index < 1:
        raise ValueError(f"rounds count from 1, got {round_index}")
    train = prompts[prompts["split"] == "train"].sort_values("group_id", kind="stable")
    if train.empty:
        raise ValueError("online RPO needs train prompts; the train split is empty")
    order = np.random.default_rng(seed).permutation(len(train))
    take = [order[i % len(order)] for i in range((round_index - 1) * per_round,
                                                 round_index * per_round)]
    if per_round > len(train):
        take = list(dict.fromkeys(take))  # fewer prompts than a round wants: each once
    rows = train.iloc[take]
    return pd.DataFrame({"group_id": rows["group_id"].to_numpy(),
                         "prompt_ids": [list(p) for p in rows["prompt_ids"]]})


def sample_groups(prompts: pd.DataFrame, completions: Sequence[Sequence[Sequence[int]]],
                  logps: Sequence[Sequence[float]]) -> pd.DataFrame:
    """K sampled completions per prompt as rows of a group, laid out like ``tokenized_examples``:
    group_id, response_index, split (train), input_ids (prompt + completion), response_start,
    tokens (completion length) and logp (log π(y|x) of the policy that sampled it)."""
    rows = []
    for gid, prompt, comps, lps in zip(prompts["group_id"], prompts["prompt_ids"], completions,
                                       logps, strict=True):
        for k, (c, lp) in enumerate(zip(comps, lps, strict=True)):
            rows.append((gid, k, "train", list(prompt) + list(c), len(prompt), len(c), lp))
    return pd.DataFrame(rows, columns=[*KEY, "split", "input_ids", "response_start", "tokens",
                                       "logp"])


def scored_groups(groups: pd.DataFrame, samples: pd.DataFrame, source: str) -> pd.DataFrame:
    """Generated responses as canonical groups, the schema data_processing writes (plus split).

    ``samples`` has group_id (the prompt's group), response_index, completion (text) and score (the
    judge's). One group per prompt: its prompt, prompt_messages and split; responses and scores in
    sample order; ``labeled_pair`` false (pairs come from the scores); ``source_file`` names the
    generator (e.g. ``generated:sft_model``), ``source_row`` the prompt's source row. Identical
    samples of one prompt are kept (they tie, so no pair is made of them; RPO needs K per group).
    """
    by_prompt = groups.set_index("group_id")
    s = samples.sort_values(["group_id", "response_index"], kind="stable")
    recs = []
    for gid, part in s.groupby("group_id", sort=False):
        g = by_prompt.loc[gid]
        responses = part["completion"].tolist()
        recs.append({"group_id": group_id(g["prompt"], [*responses, source]),
                     "prompt": g["prompt"], "prompt_messages": g["prompt_messages"],
                     "responses": responses, "scores": [float(x) for x in part["score"]],
                     "labeled_pair": False, "sft_target": None, "source_file": source,
                     "source_row": int(g["source_row"]), "split": g["split"]})
    return pd.DataFrame.from_records(recs, columns=[*GROUP_COLUMNS, "split"])


REFRESH_COLUMNS = ["round", "group_id", "chosen_input_ids", "rejected_input_ids", "response_start",
                   "gold_chosen", "gold_rejected"]


def refresh_pairs(labelled: pd.DataFrame, labels: int, seed: int, round_index: int) -> pd.DataFrame:
    """Up to ``labels`` pairs of a round's samples for the labeller (the gold judge standing in for
    human raters): in each of ``labels`` prompts (a seeded choice), the samples the reward model
    scores highest and lowest, the one with the higher gold score chosen. The reward model's own
    favourites are where a policy exploits it; a gold tie gives no pair."""
    prompts = labelled["group_id"].drop_duplicates().sort_values(kind="stable").to_numpy()
    rng = np.random.default_rng([seed, round_index])
    picked = set(rng.permutation(prompts)[:labels].tolist())
    rows = []
    for gid, g in labelled[labelled["group_id"].isin(picked)].groupby("group_id", sort=True):
        top, bottom = g.loc[g["reward"].idxmax()], g.loc[g["reward"].idxmin()]
        if top["gold"] == bottom["gold"]:
            continue
        c, r = (top, bottom) if top["gold"] > bottom["gold"] else (bottom, top)
        rows.append((round_index, gid, list(c["input_ids"]), list(r["input_ids"]),
                     int(c["response_start"]), float(c["gold"]), float(r["gold"])))
    return pd.DataFrame(rows, columns=REFRESH_COLUMNS)
