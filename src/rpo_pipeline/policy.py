"""Policy-training data: preference pairs joined with the cached reference log-probs.

Kedro-free. π_ref is never run here: reference log-probs come from the ``reference_logprobs``
table (see ``reference.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from rpo_pipeline.batching import collate

KEY = ["group_id", "response_index"]


def preference_items(tokenized: pd.DataFrame, pairs: pd.DataFrame, reference: pd.DataFrame,
                     split: str) -> tuple[list[tuple], list[int]]:
    """One item per pair of ``split``: (ids_w, start_w, ids_l, start_l, ref_w, ref_l).

    Fails when a response has no cached reference log-prob (the cache is stale or partial).
    """
    seqs = tokenized[[*KEY, "input_ids", "response_start"]].merge(
        reference[[*KEY, "ref_logp"]], on=KEY, how="left")
    p = pairs[pairs["split"] == split]
    rows = []
    for side in ("chosen", "rejected"):
        side_rows = p[["group_id", f"{side}_index"]].rename(columns={f"{side}_index": "response_index"})
        rows.append(side_rows.merge(seqs, on=KEY, how="left"))
    w, lo = rows
    missing = w["ref_logp"].isna() | lo["ref_logp"].isna()
    if missing.any():
        raise ValueError(f"{int(missing.sum())} {split} pairs have no cached reference log-prob "
                         f"(e.g. group {w.loc[missing, 'group_id'].iloc[0]}); re-run the "
                         "reference pipeline")
    items = list(zip(w["input_ids"], w["response_start"], lo["input_ids"], lo["response_start"],
                     w["ref_logp"], lo["ref_logp"], strict=True))
    lengths = [max(len(a), len(c)) for a, _, c, _, _, _ in items]
    return items, lengths


def policy_collate(pad_id: int):
    """Items of ``preference_items`` -> one right-padded batch: chosen rows, then rejected rows."""
    def fn(items: Sequence[tuple]) -> dict[str, torch.Tensor]:
        seqs = [i[0] for i in items] + [i[2] for i in items]
        starts = [i[1] for i in items] + [i[3] for i in items]
        batch = collate(seqs, starts, pad_id)
        batch["ref_logps"] = torch.tensor([i[4] for i in items] + [i[5] for i in items],
                                          dtype=torch.float64)
        return batch
    return fn
