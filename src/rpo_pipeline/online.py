"""Online RPO data: each round's prompts, the policy's samples as groups, their targets.

Kedro-free. A round samples K responses per prompt from the current policy (``evaluation.generate``),
scores them with the reward model and under π_ref, and trains the reward-aware loss on them
(``policy.group_items``, ``losses.reward_aware_loss``), starting from the previous round's policy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

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
