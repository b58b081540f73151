"""Padded batches of tokenized examples, and length-bucketed batch orders.

Kedro-free. An example is a row of ``tokenized_examples``: ``input_ids`` (prompt + response) and
``response_start`` (index of the first response token). Scoring batches, with each prompt once,
are ``scoring.shared_prefix_collate``'s.
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


def length_bucketed_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int = 0,
                            bucket_batches: int = 50, shuffle: bool = True) -> list[list[int]]:
    """Indices grouped into batches of similar length, to minimise padding.

    With ``shuffle``: the data is shuffled (seed + epoch), cut into chunks of ``bucket_batches``
    batches, each chunk sorted by length and cut into batches, then the batch order is shuffled.
    Without: batches in descending length (for inference).
    """
    lengths = np.asarray(lengths)
    if not shuffle:
        order = np.argsort(-lengths, kind="stable")
        return [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(lengths))
    chunk = batch_size * bucket_batches
    batches = []
    for i in range(0, len(perm), chunk):
        part = perm[i:i + chunk]
        part = part[np.argsort(-lengths[part], kind="stable")]
        batches += [part[j:j + batch_size].tolist() for j in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def iterate_batches(n_examples: int, lengths: Sequence[int], batch_size: int, seed: int
                    ) -> Iterator[tuple[int, list[int]]]:
    """Endless (epoch, batch indices) over length-bucketed, reshuffled epochs."""
    if n_examples == 0:
        raise ValueError("no training examples")
    epoch = 0
    while True:
        for b in length_bucketed_batches(lengths, batch_size, seed, epoch):
            yield epoch, b
        epoch += 1
