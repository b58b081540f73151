"""Canonical preference groups: validated rows -> groups (+ dropped rows), pairs, the split.

Kedro-free. The columns are in DEVELOPERS.md ('Canonical tables').
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from rpo_pipeline.preference_formats import (
    FORMATS,
    READ_ERROR,
    REQUIRED_COLUMNS,
    SOURCE_FILE,
    SOURCE_ROW,
    PreferenceDataError,
    RowError,
    file_formats,
    normalize_columns,
    parse_hh_row,
    parse_pairs_row,
    parse_prompts_row,
    parse_scored_row,
    parse_text_row,
)


# --------------------------------------------------------------------------------------------------
# Ingestion: rows -> groups (+ dropped rows)
# --------------------------------------------------------------------------------------------------
def group_id(prompt: str, responses: Sequence[str]) -> str:
    """Stable content id of a group (prompt + responses), 16 hex chars."""
    h = hashlib.blake2b(digest_size=8)
    h.update(prompt.encode())
    for r in responses:
        h.update(b"\x00")
        h.update(r.encode())
    return h.hexdigest()


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    return str(v) if not isinstance(v, str | int | float | bool | list | dict | type(None)) else v


@dataclass
class IngestResult:
    groups: pd.DataFrame
    dropped: pd.DataFrame
    format: str
    rows_in: int

    @property
    def counts(self) -> dict[str, int]:
        return {"rows_in": self.rows_in, "rows_out": len(self.groups),
                "rows_dropped": len(self.dropped)}


GROUP_COLUMNS = ["group_id", "prompt", "prompt_messages", "responses", "scores", "labeled_pair",
                 "sft_target", "source_file", "source_row"]
DROPPED_COLUMNS = ["source_file", "source_row", "reason", "record"]


def ingest(df: pd.DataFrame, fmt: str = "auto", on_invalid: str = "raise",
           columns: dict[str, str] | None = None, source: str = "raw_preferences",
           prompt_words: tuple[int, int] = (2, 8), seed: int = 0) -> IngestResult:
    """Validate raw rows and turn them into canonical groups.

    ``on_invalid='raise'`` stops at the first invalid row (the error names the file, the row and
    the reason, and counts the others); ``'drop'`` drops invalid rows and reports each with its
    reason. rows_in == rows_out + rows_dropped always.
    """
    if on_invalid not in ("raise", "drop"):
        raise ValueError(f"on_invalid must be 'raise' or 'drop', got {on_invalid!r}")
    if fmt not in ("auto", *FORMATS):
        raise ValueError(f"data_processing.format must be one of auto, {', '.join(FORMATS)}; got {fmt!r}")
    if SOURCE_FILE not in df.columns:
        df = df.assign(**{SOURCE_FILE: source, SOURCE_ROW: range(1, len(df) + 1)})
    read_errors = ([e if isinstance(e, str) else None for e in df[READ_ERROR]]
                   if READ_ERROR in df.columns else [None] * len(df))
    files, rows = df[SOURCE_FILE].tolist(), df[SOURCE_ROW].tolist()
    readable_rows = [e is None for e in read_errors]
    if not any(readable_rows):
        i = next(i for i, e in enumerate(read_errors) if e is not None) if len(df) else None
        first = f"; the first: {files[i]}: row {rows[i]}: {read_errors[i]}" if i is not None else ""
        raise PreferenceDataError(f"{source}: no row could be read{first}")

    df = normalize_columns(df, columns)
    formats = file_formats(df[readable_rows], fmt)
    if len(set(formats.values())) > 1:
        found = "; ".join(f"{f}: {k}{' with scores' if sc else ''}" for f, (k, sc) in formats.items())
        raise PreferenceDataError(
            f"files of different formats under one path: {found}. Read each format through its own "
            "catalog entry (or convert them to one format)")
    fmt, has_scores = next(iter(formats.values()))

    needed = list(REQUIRED_COLUMNS[fmt]) + (["score_chosen", "score_rejected"] if has_scores else [])
    col_values = {c: df[c].tolist() if c in df.columns else [None] * len(df) for c in needed}
    parse = {"pairs": lambda r: parse_pairs_row(r, has_scores), "hh": parse_hh_row,
             "scored": parse_scored_row, "prompts": parse_prompts_row,
             "text": lambda r: parse_text_row(r, tuple(prompt_words), seed)}[fmt]

    out: dict[str, list] = {c: [] for c in GROUP_COLUMNS}
    dropped: list[tuple] = []
    first_seen: dict[str, int] = {}
    for i in range(len(df)):
        record = {c: col_values[c][i] for c in needed}
        try:
            if read_errors[i] is not None:
                record = {}
                raise RowError(read_errors[i])
            g = parse(record)
            gid = group_id(g.prompt, g.responses if g.sft_target is None else [g.sft_target])
            if gid in first_seen:
                raise RowError(f"duplicate of row {rows[first_seen[gid]]}")
        except RowError as e:
            if on_invalid == "raise":
                raise PreferenceDataError(
                    f"{files[i]}: row {rows[i]}: {e} (set data_processing.on_invalid: drop to drop "
                    f"invalid rows and report them)") from None
            dropped.append((files[i], rows[i], str(e),
                            json.dumps({k: _jsonable(v) for k, v in record.items()},
                                       ensure_ascii=False, default=str)))
            continue
        first_seen[gid] = i
        out["group_id"].append(gid)
        out["prompt"].append(g.prompt)
        out["prompt_messages"].append(json.dumps(g.prompt_messages) if g.prompt_messages else None)
        out["responses"].append(g.responses)
        out["scores"].append(g.scores)
        out["labeled_pair"].append(g.labeled_pair)
        out["sft_target"].append(g.sft_target)
        out["source_file"].append(files[i])
        out["source_row"].append(int(rows[i]))
    if dropped and not out["group_id"]:
        f, r, why, _ = dropped[0]
        raise PreferenceDataError(f"{f}: row {r}: {why} (and every other row of {source} was "
                                  f"invalid too: {len(dropped)} dropped, none left)")
    groups = pd.DataFrame(out, columns=GROUP_COLUMNS)
    dropped_df = pd.DataFrame(dropped, columns=DROPPED_COLUMNS)
    result = IngestResult(groups, dropped_df, fmt, len(df))
    assert result.rows_in == len(groups) + len(dropped_df), "row accounting broken"
    return result


# --------------------------------------------------------------------------------------------------
# Split and pairs
# --------------------------------------------------------------------------------------------------
SPLITS = ("train", "val", "test")


def split_of(prompt: str, fractions: dict[str, float], seed: int) -> str:
    """Deterministic split of a prompt from a seeded hash of its text."""
    h = hashlib.blake2b(f"{seed}\x00{prompt}".encode(), digest_size=8).digest()
    u = int.from_bytes(h, "big") / 2**64
    acc = 0.0
    for name in SPLITS:
        acc += fractions.get(name, 0.0)
        if u < acc:
            return name
    return SPLITS[-1]


def assign_splits(groups: pd.DataFrame, fractions: dict[str, float], seed: int) -> pd.DataFrame:
    """Add a ``split`` column; every group of one prompt lands in the same split."""
    unknown = set(fractions) - set(SPLITS)
    if unknown or any(v < 0 for v in fractions.values()) or abs(sum(fractions.values()) - 1) > 1e-6:
        raise ValueError(f"split fractions must be train/val/test >= 0 summing to 1, got {fractions}")
    by_prompt = {p: split_of(p, fractions, seed) for p in set(groups["prompt"])}
    splits = [by_prompt[p] for p in groups["prompt"]]
    return groups.assign(split=splits)


PAIR_COLUMNS = ["group_id", "prompt", "chosen", "rejected", "chosen_index", "rejected_index",
                "score_chosen", "score_rejected"]


def _pair_record(row: Any, responses: list[str], scores: list[float] | None, ci: int, ri: int,
                 columns: Sequence[str]) -> dict[str, Any]:
    return {"group_id": row.group_id, "prompt": row.prompt, "chosen": responses[ci],
            "rejected": responses[ri], "chosen_index": ci, "rejected_index": ri,
            "score_chosen": None if scores is None else scores[ci],
            "score_rejected": None if scores is None else scores[ri],
            **({"split": row.split} if "split" in columns else {})}


def groups_to_pairs(groups: pd.DataFrame, rejected: str = "worst", seed: int = 0) -> pd.DataFrame:
    """One preference pair per group, or (``'all'``) every ordered pair of a scored group.

    Labelled pairs keep their label (response 0 chosen, even when scores tie). Scored groups:
    chosen = best-scored response; rejected = the worst-scored one (``'worst'``) or a seeded random
    response scored below the best (``'random'``, as in the RPO paper). ``'all'``: each of the
    K(K−1)/2 comparisons of a group whose scores differ, the higher-scored response chosen
    (InstructGPT's reward-model data). Scored groups whose responses all tie carry no preference
    and yield no pair.
    """
    if rejected not in ("worst", "random", "all"):
        raise ValueError(f"rejected must be 'worst', 'random' or 'all', got {rejected!r}")
    recs = []
    for row in groups.itertuples(index=False):
        responses = list(row.responses)
        if len(responses) < 2:  # prompt-only and text groups: nothing to prefer (yet)
            continue
        scores = None if row.scores is None else [float(s) for s in row.scores]
        if row.labeled_pair or scores is None:
            ci, ri = 0, 1
        elif rejected == "all":
            for ci, ri in itertools.permutations(range(len(scores)), 2):
                if scores[ci] > scores[ri]:
                    recs.append(_pair_record(row, responses, scores, ci, ri, groups.columns))
            continue
        else:
            ci = max(range(len(scores)), key=lambda k: (scores[k], -k))
            lower = [k for k in range(len(scores)) if scores[k] < scores[ci]]
            if not lower:
                continue
            if rejected == "worst":
                ri = min(lower, key=lambda k: (scores[k], k))
            else:
                ri = random.Random(f"{seed}:{row.group_id}").choice(lower)
        recs.append(_pair_record(row, responses, scores, ci, ri, groups.columns))
    return pd.DataFrame.from_records(recs, columns=PAIR_COLUMNS
                                     + (["split"] if "split" in groups.columns else []))

