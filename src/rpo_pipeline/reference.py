"""π_ref: choose SFT examples, and score responses under a frozen model (the log-prob cache).

Kedro-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from rpo_pipeline.scoring import ResponseLogps, packed_collate, scoring_batches
from rpo_pipeline.training import local_device, to_device, world

# Bump when the log-prob computation changes meaning; it is part of the cache fingerprint.
LOGPROB_VERSION = 1
KEY = ["group_id", "response_index"]


def select_examples(tokenized: pd.DataFrame, pairs: pd.DataFrame, splits: Sequence[str],
                    responses: str = "all") -> pd.DataFrame:
    """Examples of ``splits``: every response (``all``) or only each pair's chosen one."""
    rows = tokenized[tokenized["split"].isin(list(splits))]
    if responses == "all":
        return rows.reset_index(drop=True)
    if responses == "chosen":
        chosen = pairs[["group_id", "chosen_index"]].rename(columns={"chosen_index": "response_index"})
        return rows.merge(chosen, on=KEY, how="inner").reset_index(drop=True)
    raise ValueError(f"reference.sft.responses must be 'all' or 'chosen', got {responses!r}")


class SftExample(NamedTuple):
    """One SFT item: prompt + response tokens and where the response starts (the loss is on the
    response tokens only)."""

    input_ids: list[int]
    response_start: int


def sft_items(rows: pd.DataFrame) -> tuple[list[SftExample], list[int]]:
    """One ``SftExample`` per row of ``tokenized_examples`` (or ``tokenized_sft_targets``), and its
    length."""
    items = [SftExample(ids, start) for ids, start in zip(rows["input_ids"], rows["response_start"],
                                                           strict=True)]
    return items, rows["length"].tolist()


def sft_collate():
    """``SftExample`` items -> one packed batch (``scoring.packed_collate``; rows with the same
    prompt share it)."""
    def fn(items: Sequence[SftExample]) -> dict[str, torch.Tensor]:
        return packed_collate([i.input_ids for i in items], [i.response_start for i in items])
    return fn


@torch.inference_mode()
def response_logps(model: torch.nn.Module, input_ids: Sequence[Sequence[int]],
                    response_starts: Sequence[int], batch_size: int = 64,
                    device: str = "auto", progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Summed response log-prob and response token count of every sequence, in input order.

    Rows that share a prompt go in one batch and the prompt runs once (``scoring``, packed); float32 on
    the given device, or in the caller's autocast (``jobs.run_inference``). In a process group each
    rank computes every N-th batch (zeros elsewhere): the batches, and so the values, are those of
    one process, and summing the ranks' arrays gives its table exactly.
    """
    dev = local_device(device)
    scorer = ResponseLogps(model.to(dev)).eval()
    logp = np.zeros(len(input_ids), dtype=np.float64)
    count = np.zeros(len(input_ids), dtype=np.int64)
    rank, size = world()
    batches = scoring_batches(input_ids, response_starts, batch_size)[rank::size]
    for idx in tqdm(batches, desc="reference log-probs", disable=not progress, dynamic_ncols=True):
        batch = packed_collate([input_ids[i] for i in idx], [response_starts[i] for i in idx])
        s, n = scorer(to_device(batch, dev))
        logp[idx] = s.float().cpu().numpy()
        count[idx] = n.cpu().numpy()
    return logp, count


def reference_table(examples: pd.DataFrame, logp: np.ndarray, n_tokens: np.ndarray) -> pd.DataFrame:
    """The cache table: one row per (group_id, response_index)."""
    out = examples[["group_id", "response_index", "split"]].copy()
    out["ref_logp"] = logp
    out["ref_tokens"] = n_tokens
    return out.sort_values(KEY, kind="stable").reset_index(drop=True)

