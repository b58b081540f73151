"""Policy-training data: preference pairs joined with the cached reference log-probs.

Kedro-free. π_ref is never run here: reference log-probs come from the ``reference_logprobs``
table (see ``reference.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import pandas as pd
import torch

from rpo_pipeline.scoring import packed_collate

KEY = ["group_id", "response_index"]


class PreferencePair(NamedTuple):
    """One DPO training item (TRL's names): both sides' tokens (prompt + response), where each
    response starts, and π_ref's summed log-probs of the responses (from ``reference_logprobs``)."""

    chosen_input_ids: list[int]
    chosen_response_start: int
    rejected_input_ids: list[int]
    rejected_response_start: int
    ref_chosen_logps: float
    ref_rejected_logps: float


class ResponseGroup(NamedTuple):
    """One RPO training item: the K responses of a prompt (tokens, response starts), π_ref's
    summed log-probs of each and the target reward r*(x, y_k) of each."""

    input_ids: list[list[int]]
    response_starts: list[int]
    ref_logps: list[float]
    target_rewards: list[float]


def pair_sides(tokenized: pd.DataFrame, pairs: pd.DataFrame, split: str,
               reference: pd.DataFrame | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Chosen and rejected rows of each pair of ``split``, aligned row by row: group_id,
    response_index, input_ids, response_start (and ref_logp from ``reference``, NaN if missing)."""
    seqs = tokenized[[*KEY, "input_ids", "response_start"]]
    if reference is not None:
        seqs = seqs.merge(reference[[*KEY, "ref_logp"]], on=KEY, how="left")
    p = pairs[pairs["split"] == split]
    chosen, rejected = (
        p[["group_id", f"{side}_index"]].rename(columns={f"{side}_index": "response_index"})
        .merge(seqs, on=KEY, how="left") for side in ("chosen", "rejected"))
    return chosen, rejected


def preference_items(tokenized: pd.DataFrame, pairs: pd.DataFrame, reference: pd.DataFrame,
                     split: str) -> tuple[list[PreferencePair], list[int]]:
    """One ``PreferencePair`` per pair of ``split``, and its length (the longer side).

    Fails when a response has no cached reference log-prob (the cache is stale or partial).
    """
    w, lo = pair_sides(tokenized, pairs, split, reference)
    missing = w["ref_logp"].isna() | lo["ref_logp"].isna()
    if missing.any():
        raise ValueError(f"{int(missing.sum())} {split} pairs have no cached reference log-prob "
                         f"(e.g. group {w.loc[missing, 'group_id'].iloc[0]}); re-run the "
                         "reference pipeline")
    items = [PreferencePair(*row) for row in zip(
        w["input_ids"], w["response_start"], lo["input_ids"], lo["response_start"], w["ref_logp"],
        lo["ref_logp"], strict=True)]
    lengths = [max(len(i.chosen_input_ids), len(i.rejected_input_ids)) for i in items]
    return items, lengths


def policy_collate(share_prompt: bool = True):
    """``PreferencePair`` items -> one packed batch (``scoring.packed_collate``: each pair one
    segment, prompt + chosen + rejected): chosen rows, then rejected. ``share_prompt=False``: one
    segment per row instead (the unshared computation)."""
    def fn(items: Sequence[PreferencePair]) -> dict[str, torch.Tensor]:
        seqs = [i.chosen_input_ids for i in items] + [i.rejected_input_ids for i in items]
        starts = [i.chosen_response_start for i in items] + [i.rejected_response_start for i in items]
        batch = packed_collate(seqs, starts, share_prompt)
        batch["ref_logps"] = torch.tensor([i.ref_chosen_logps for i in items]
                                          + [i.ref_rejected_logps for i in items], dtype=torch.float64)
        return batch
    return fn


# --------------------------------------------------------------------------------------------------
# RPO: groups of K responses with target rewards
# --------------------------------------------------------------------------------------------------
def reward_targets(groups: pd.DataFrame, reward_scores: pd.DataFrame | None,
                   reward_stats: dict | None, source: str = "reward_model",
                   normalization: str = "zscore") -> pd.DataFrame:
    """r*(x, y_k) per (group_id, response_index), normalised.

    ``source``: ``reward_model`` (the reward_model stage's scores) or ``dataset`` (the scores in the
    data). ``normalization``: ``none``; ``zscore`` with the train split's mean/std (the
    reward_model stage's ``reward_stats`` for model scores); ``per_prompt`` (centred within each
    group).
    """
    if source == "reward_model":
        t = reward_scores[[*KEY, "split", "reward"]].rename(columns={"reward": "target"})
    elif source == "dataset":
        g = groups[groups["scores"].notna()]
        t = g[["group_id", "split", "scores"]].explode("scores").rename(columns={"scores": "target"})
        t["response_index"] = t.groupby("group_id").cumcount()
        t["target"] = t["target"].astype(float)
    else:
        raise ValueError(f"rpo.reward_source must be 'reward_model' or 'dataset', got {source!r}")
    if normalization == "zscore":
        if source == "reward_model":
            mean, std = reward_stats["mean"], reward_stats["std"]
        else:
            train = t.loc[t["split"] == "train", "target"]
            mean, std = float(train.mean()), float(train.std(ddof=0))
        t["target"] = (t["target"] - mean) / (std if std > 0 else 1.0)
    elif normalization == "per_prompt":
        t["target"] = t["target"] - t.groupby("group_id")["target"].transform("mean")
    elif normalization != "none":
        raise ValueError(f"rpo.reward_normalization must be none, zscore or per_prompt; got {normalization!r}")
    return t[[*KEY, "target"]].reset_index(drop=True)


def group_items(tokenized: pd.DataFrame, reference: pd.DataFrame, targets: pd.DataFrame,
                split: str) -> tuple[list[ResponseGroup], list[int]]:
    """One ``ResponseGroup`` per group of ``split``, and its length (the longest response).

    Every group must have the same number of responses K (a batch is a (B, K) block).
    """
    rows = tokenized[tokenized["split"] == split][[*KEY, "input_ids", "response_start"]]
    rows = rows.merge(reference[[*KEY, "ref_logp"]], on=KEY, how="left")
    rows = rows.merge(targets, on=KEY, how="left").sort_values(KEY, kind="stable")
    missing = rows["ref_logp"].isna() | rows["target"].isna()
    if missing.any():
        raise ValueError(f"{int(missing.sum())} {split} responses lack a cached reference log-prob "
                         "or a target reward; re-run the reference and reward_model pipelines")
    sizes = rows.groupby("group_id", sort=False).size()
    if sizes.nunique() > 1:
        raise ValueError(f"RPO needs the same number of responses in every group; found sizes "
                         f"{sorted(sizes.unique().tolist())}")
    items = [ResponseGroup(list(g["input_ids"]), list(g["response_start"]), list(g["ref_logp"]),
                           list(g["target"])) for _, g in rows.groupby("group_id", sort=False)]
    return items, [max(len(x) for x in it.input_ids) for it in items]


def group_collate(share_prompt: bool = True):
    """``ResponseGroup`` items -> one packed batch of B·K rows (each group one segment: prompt +
    its K responses), group-major, ``group_size`` = K. ``share_prompt=False``: one segment per row
    instead (the unshared computation)."""
    def fn(items: Sequence[ResponseGroup]) -> dict[str, torch.Tensor]:
        seqs = [s for it in items for s in it.input_ids]
        starts = [s for it in items for s in it.response_starts]
        batch = packed_collate(seqs, starts, share_prompt)
        batch["ref_logps"] = torch.tensor([r for it in items for r in it.ref_logps], dtype=torch.float64)
        batch["targets"] = torch.tensor([r for it in items for r in it.target_rewards],
                                        dtype=torch.float64)
        batch["group_size"] = torch.tensor(len(items[0].input_ids))
        return batch
    return fn
