"""Padded batches of tokenized examples, and length-bucketed batch orders.

Kedro-free. An example is a row of ``tokenized_examples``: ``input_ids`` (prompt + response) and
``response_start`` (index of the first response token). Padded rows are what generation takes;
scoring and training batches are ``scoring.packed_collate``'s.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch


def collate(examples: Sequence[Sequence[int]], response_starts: Sequence[int], pad_id: int,
            padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad to a batch: ``input_ids``, ``attention_mask``, ``response_mask``, ``position_ids``.

    ``response_mask[b, t]`` is True where token t of example b belongs to the response. Position ids
    count real tokens only, so left and right padding give the same positions.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    width = max(len(x) for x in examples)
    n = len(examples)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    attn = torch.zeros((n, width), dtype=torch.long)
    resp = torch.zeros((n, width), dtype=torch.bool)
    for b, (x, start) in enumerate(zip(examples, response_starts, strict=True)):
        off = width - len(x) if padding_side == "left" else 0
        ids[b, off:off + len(x)] = torch.from_numpy(np.array(x, dtype=np.int64))
        attn[b, off:off + len(x)] = 1
        resp[b, off + int(start):off + len(x)] = True
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": attn, "response_mask": resp,
            "position_ids": positions}


def cut(order: Sequence[int], batch_size: int, tokens: Sequence[int] | None = None,
        max_tokens: int | None = None) -> list[list[int]]:
    """``order`` cut into consecutive batches of at most ``batch_size`` items and, with
    ``max_tokens``, at most that many ``tokens`` (an item above the budget is a batch alone)."""
    if max_tokens is None:
        return [list(order[i:i + batch_size]) for i in range(0, len(order), batch_size)]
    batches: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i in order:
        if current and (len(current) == batch_size or used + tokens[i] > max_tokens):
            batches.append(current)
            current, used = [], 0
        current.append(int(i))
        used += tokens[i]
    return batches + ([current] if current else [])


def length_bucketed_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int = 0,
                            bucket_batches: int = 50, shuffle: bool = True,
                            tokens: Sequence[int] | None = None,
                            max_tokens: int | None = None) -> list[list[int]]:
    """Indices grouped into batches of similar length, to minimise padding.

    With ``shuffle``: the data is shuffled (seed + epoch), cut into chunks of ``bucket_batches``
    batches, each chunk sorted by length and cut into batches, then the batch order is shuffled.
    Without: batches in descending length (for inference). Batches hold ``batch_size`` items, or
    with ``max_tokens`` as many as fit in that many ``tokens`` (at most ``batch_size``).
    """
    lengths = np.asarray(lengths)
    if max_tokens is not None and tokens is None:
        raise ValueError("max_tokens needs each item's tokens")
    if not shuffle:
        return cut(np.argsort(-lengths, kind="stable").tolist(), batch_size, tokens, max_tokens)
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(lengths))
    chunk = batch_size * bucket_batches
    batches = []
    for i in range(0, len(perm), chunk):
        part = perm[i:i + chunk]
        part = part[np.argsort(-lengths[part], kind="stable")]
        batches += cut(part.tolist(), batch_size, tokens, max_tokens)
    rng.shuffle(batches)
    return batches


def iterate_batches(n_examples: int, lengths: Sequence[int], batch_size: int, seed: int,
                    tokens: Sequence[int] | None = None, max_tokens: int | None = None
                    ) -> Iterator[tuple[int, list[int]]]:
    """Endless (epoch, batch indices) over length-bucketed, reshuffled epochs."""
    if n_examples == 0:
        raise ValueError("no training examples")
    epoch = 0
    while True:
        for b in length_bucketed_batches(lengths, batch_size, seed, epoch, tokens=tokens,
                                         max_tokens=max_tokens):
            yield epoch, b
        epoch += 1
