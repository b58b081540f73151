"""Preference data: read files, detect the format, validate rows, build canonical tables, split.

Kedro-free. Three input formats are accepted:

* ``pairs``  -- ``prompt``, ``chosen``, ``rejected`` (strings, or TRL's conversational form: lists of
  ``{role, content}`` messages), optional ``score_chosen`` / ``score_rejected``.
* ``hh``     -- Anthropic HH-RLHF: full transcripts ``chosen`` / ``rejected``; the prompt is the shared
  prefix up to and including the last ``"\\n\\nAssistant:"``.
* ``scored`` -- K responses per prompt: ``prompt``, ``responses`` (list of str), ``scores`` (list of
  float, same length, K >= 2).

Everything becomes one **group** per row: ``prompt``, ``responses`` (K >= 2), ``scores`` (or None)
and ``labeled_pair`` (True for ``pairs`` / ``hh`` rows: response 0 is the labelled preferred one,
whatever the scores; False for ``scored`` groups, ranked by score). Pairs are derived from groups.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import math
import os
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pandas as pd

FORMATS = ("pairs", "hh", "scored")
SOURCE_FILE, SOURCE_ROW = "_source_file", "_source_row"
HH_ASSISTANT = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"
_FORMAT_HELP = (
    "pairs (prompt, chosen, rejected[, score_chosen, score_rejected]), "
    "hh (chosen, rejected: full '\\n\\nHuman: ... \\n\\nAssistant: ...' transcripts), "
    "scored (prompt, responses, scores)"
)


class PreferenceDataError(ValueError):
    """Bad preference data: the message names the file, the row and the reason."""


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------
def _strip_gz(path: str) -> tuple[str, bool]:
    return (path[:-3], True) if path.endswith(".gz") else (path, False)


def read_preference_file(path: str, file_format: str | None = None) -> pd.DataFrame:
    """Read one jsonl / json / parquet / csv file (gzip or not; local path or fsspec URL).

    Adds ``_source_file`` and ``_source_row`` (1-based: the line for jsonl, the element for a JSON
    array, the data row for csv and parquet) so that errors can point at the input.
    """
    stem, gz = _strip_gz(path)
    ext = (file_format or os.path.splitext(stem)[1].lstrip(".")).lower()
    compression = "gzip" if gz else None
    with fsspec.open(path, "rb", compression=compression) as f:
        raw = f.read()
    if ext in ("jsonl", "ndjson"):
        records, rows = [], []
        for lineno, line in enumerate(io.BytesIO(raw), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise PreferenceDataError(f"{path}: row {lineno}: invalid JSON ({e.msg})") from None
            rows.append(lineno)
        df = pd.DataFrame.from_records(records) if records else pd.DataFrame()
    elif ext == "json":
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise PreferenceDataError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
        if isinstance(data, dict):  # {"data": [...]}: a single list of records inside an object
            lists = [v for v in data.values() if isinstance(v, list)]
            data = lists[0] if len(lists) == 1 else data
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise PreferenceDataError(f"{path}: expected a JSON array of objects")
        df, rows = pd.DataFrame.from_records(data), list(range(1, len(data) + 1))
    elif ext == "parquet":
        df = pd.read_parquet(io.BytesIO(raw))
        rows = list(range(1, len(df) + 1))
    elif ext in ("csv", "tsv"):
        df = pd.read_csv(io.BytesIO(raw), sep="\t" if ext == "tsv" else ",", keep_default_na=False,
                         na_values=[""], dtype=object)
        rows = list(range(1, len(df) + 1))
    else:
        raise PreferenceDataError(
            f"{path}: unsupported file type '{ext}'; use jsonl, json, parquet or csv (optionally .gz)")
    df[SOURCE_FILE] = path
    df[SOURCE_ROW] = rows
    return df


def read_preference_files(pattern: str, file_format: str | None = None) -> pd.DataFrame:
    """Read every file matching ``pattern`` (a path, a glob, or an fsspec URL) into one table."""
    if "://" in pattern:
        paths = [pattern]
    else:
        paths = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not paths or not all(os.path.exists(p) for p in paths):
            raise PreferenceDataError(f"{pattern}: no such file")
    frames = [read_preference_file(p, file_format) for p in paths]
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


# --------------------------------------------------------------------------------------------------
# Columns and format detection
# --------------------------------------------------------------------------------------------------
def _data_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c not in (SOURCE_FILE, SOURCE_ROW)]


def _lookup(record: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        record = record.get(key) if isinstance(record, dict) else None
    return record


def normalize_columns(df: pd.DataFrame, columns: dict[str, str] | None = None) -> pd.DataFrame:
    """Rename columns to the canonical names.

    ``columns`` maps canonical name -> source column, where the source may be a dotted path into a
    dict column (``score_chosen: metadata.score_chosen``). Without a mapping, ``score_chosen`` and
    ``score_rejected`` are also found inside a dict column (UltraFeedback keeps them in
    ``metadata``).
    """
    df = df.copy()
    mapping = dict(columns or {})
    dict_cols = [c for c in _data_columns(df)
                 if df[c].dtype == object and df[c].map(lambda v: isinstance(v, dict)).any()]
    for name in ("score_chosen", "score_rejected"):
        if name in df.columns or name in mapping:
            continue
        for c in dict_cols:
            if df[c].map(lambda v, n=name: isinstance(v, dict) and n in v).any():
                mapping[name] = f"{c}.{name}"
                break
    for target, source in mapping.items():
        if source in df.columns:
            df[target] = df[source]
        elif "." in source and source.split(".")[0] in df.columns:
            df[target] = df[source.split(".")[0]].map(lambda v, s=source: _lookup(
                {s.split(".")[0]: v}, s))
        else:
            raise PreferenceDataError(
                f"column mapping {target}: {source}: no column '{source}' in {_data_columns(df)}")
    return df


def detect_format(columns: Iterable[str], source: str = "raw_preferences") -> str:
    """Pick the format from the columns; fail with the columns found and the formats supported."""
    cols = set(columns) - {SOURCE_FILE, SOURCE_ROW}
    if {"prompt", "responses", "scores"} <= cols:
        return "scored"
    if {"prompt", "chosen", "rejected"} <= cols:
        return "pairs"
    if {"chosen", "rejected"} <= cols:
        return "hh"
    raise PreferenceDataError(
        f"{source}: cannot detect the preference format from the columns {sorted(cols)}; "
        f"supported formats: {_FORMAT_HELP}")


REQUIRED_COLUMNS = {"pairs": ("prompt", "chosen", "rejected"), "hh": ("chosen", "rejected"),
                    "scored": ("prompt", "responses", "scores")}


# --------------------------------------------------------------------------------------------------
# Row parsing and validation
# --------------------------------------------------------------------------------------------------
class RowError(Exception):
    """One invalid row; the message is the reason."""


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA


def _text(value: Any, name: str) -> str:
    if _is_missing(value):
        raise RowError(f"missing value in '{name}'")
    if not isinstance(value, str):
        raise RowError(f"'{name}' is {type(value).__name__}, expected a string")
    if not value.strip():
        raise RowError(f"'{name}' is empty or whitespace")
    return value


def _score(value: Any, name: str) -> float:
    if _is_missing(value):
        raise RowError(f"'{name}' is missing or NaN")
    if isinstance(value, bool) or not isinstance(value, int | float | np.number | str):
        raise RowError(f"'{name}' is {type(value).__name__}, expected a number")
    try:
        x = float(value)
    except ValueError:
        raise RowError(f"'{name}' is {value!r}, expected a number") from None
    if math.isnan(x):
        raise RowError(f"'{name}' is missing or NaN")
    if math.isinf(x):
        raise RowError(f"'{name}' is infinite")
    return x


def _as_list(value: Any, name: str) -> list:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, str) and value.lstrip().startswith("["):  # csv cells hold JSON lists
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RowError(f"'{name}' is not a valid JSON list") from None
    if _is_missing(value):
        raise RowError(f"missing value in '{name}'")
    if not isinstance(value, list | tuple):
        raise RowError(f"'{name}' is {type(value).__name__}, expected a list")
    return list(value)


def _messages(value: Any, name: str) -> list[dict[str, str]]:
    msgs = _as_list(value, name)
    if not msgs:
        raise RowError(f"'{name}' is an empty message list")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RowError(f"'{name}[{i}]' is not a {{role, content}} message")
        out.append({"role": str(m["role"]), "content": _text(m["content"], f"{name}[{i}].content")})
    return out


def render_messages(messages: Sequence[dict[str, str]]) -> str:
    """Plain-text prompt for a message list: a single user turn is its content; else a transcript."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    turns = [f"{names.get(m['role'], m['role'].title())}: {m['content']}" for m in messages]
    return "\n\n".join(turns) + "\n\nAssistant:"


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def parse_hh_transcript(text: str) -> list[dict[str, str]]:
    """Split an HH transcript into ``{role, content}`` messages (Human -> user)."""
    parts = _HH_TURN.split(text)  # [before, role, content, role, content, ...]
    return [{"role": "user" if role == "Human" else "assistant", "content": content.strip()}
            for role, content in zip(parts[1::2], parts[2::2], strict=True)]


@dataclass
class Group:
    prompt: str
    responses: list[str]
    scores: list[float] | None
    prompt_messages: list[dict[str, str]] | None = field(default=None)
    labeled_pair: bool = True


def _distinct(responses: list[str], names: list[str]) -> None:
    seen: dict[str, int] = {}
    for i, r in enumerate(responses):
        if r in seen:
            a, b = names[seen[r]], names[i]
            raise RowError(f"{a} and {b} are identical")
        seen[r] = i


def parse_pairs_row(row: dict[str, Any], has_scores: bool) -> Group:
    prompt_v, chosen_v, rejected_v = row["prompt"], row["chosen"], row["rejected"]
    conversational = isinstance(prompt_v, list | np.ndarray) or isinstance(chosen_v, list | np.ndarray)
    if conversational:
        prompt_msgs = _messages(prompt_v, "prompt")
        chosen = _messages(chosen_v, "chosen")[-1]["content"]
        rejected = _messages(rejected_v, "rejected")[-1]["content"]
        prompt = render_messages(prompt_msgs)
    else:
        prompt_msgs = None
        prompt = _text(prompt_v, "prompt")
        chosen, rejected = _text(chosen_v, "chosen"), _text(rejected_v, "rejected")
    _distinct([chosen, rejected], ["chosen", "rejected"])
    scores = None
    if has_scores:
        scores = [_score(row["score_chosen"], "score_chosen"),
                  _score(row["score_rejected"], "score_rejected")]
        if scores[0] < scores[1]:
            raise RowError(f"score_chosen {scores[0]:g} < score_rejected {scores[1]:g}")
    return Group(prompt, [chosen, rejected], scores, prompt_msgs)


def parse_hh_row(row: dict[str, Any]) -> Group:
    chosen_v, rejected_v = row["chosen"], row["rejected"]
    if isinstance(chosen_v, list | np.ndarray):  # conversational, implicit prompt
        c, r = _messages(chosen_v, "chosen"), _messages(rejected_v, "rejected")
        if c[:-1] != r[:-1]:
            raise RowError("chosen and rejected conversations differ before the last message")
        return parse_pairs_row({"prompt": c[:-1] or [{"role": "user", "content": ""}],
                                "chosen": c[-1:], "rejected": r[-1:]}, has_scores=False)
    chosen, rejected = _text(chosen_v, "chosen"), _text(rejected_v, "rejected")
    cut = chosen.rfind(HH_ASSISTANT)  # fast path: rejected shares chosen's last-turn prefix
    if cut < 0 or not rejected.startswith(chosen[:cut + len(HH_ASSISTANT)]):
        cut = os.path.commonprefix([chosen, rejected]).rfind(HH_ASSISTANT)
    if cut < 0:
        raise RowError("chosen and rejected share no prefix ending in '\\n\\nAssistant:'")
    cut += len(HH_ASSISTANT)
    prompt = chosen[:cut].strip()
    resp_c, resp_r = chosen[cut:].strip(), rejected[cut:].strip()
    if not resp_c:
        raise RowError("chosen response (after the last '\\n\\nAssistant:') is empty")
    if not resp_r:
        raise RowError("rejected response (after the last '\\n\\nAssistant:') is empty")
    _distinct([resp_c, resp_r], ["chosen", "rejected"])
    return Group(prompt, [resp_c, resp_r], None, parse_hh_transcript(chosen[:cut - len(HH_ASSISTANT)]))


def parse_scored_row(row: dict[str, Any]) -> Group:
    prompt = _text(row["prompt"], "prompt")
    responses = _as_list(row["responses"], "responses")
    scores = _as_list(row["scores"], "scores")
    if len(responses) != len(scores):
        raise RowError(f"'responses' has {len(responses)} items but 'scores' has {len(scores)}")
    if len(responses) < 2:
        raise RowError(f"needs at least 2 responses, got {len(responses)}")
    responses = [_text(r, f"responses[{i}]") for i, r in enumerate(responses)]
    scores = [_score(s, f"scores[{i}]") for i, s in enumerate(scores)]
    _distinct(responses, [f"responses[{i}]" for i in range(len(responses))])
    return Group(prompt, responses, scores, labeled_pair=False)


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
                 "source_file", "source_row"]
DROPPED_COLUMNS = ["source_file", "source_row", "reason", "record"]


def ingest(df: pd.DataFrame, fmt: str = "auto", on_invalid: str = "raise",
           columns: dict[str, str] | None = None, source: str = "raw_preferences") -> IngestResult:
    """Validate raw rows and turn them into canonical groups.

    ``on_invalid='raise'`` stops at the first invalid row (the error names the file, the row and
    the reason, and counts the others); ``'drop'`` drops invalid rows and reports each with its
    reason. rows_in == rows_out + rows_dropped always.
    """
    if on_invalid not in ("raise", "drop"):
        raise ValueError(f"on_invalid must be 'raise' or 'drop', got {on_invalid!r}")
    if SOURCE_FILE not in df.columns:
        df = df.assign(**{SOURCE_FILE: source, SOURCE_ROW: range(1, len(df) + 1)})
    where = ", ".join(sorted(set(df[SOURCE_FILE].astype(str)))) or source
    df = normalize_columns(df, columns)
    if fmt == "auto":
        fmt = detect_format(df.columns, where)
    if fmt not in FORMATS:
        raise ValueError(f"data_processing.format must be one of auto, {', '.join(FORMATS)}; got {fmt!r}")
    missing = [c for c in REQUIRED_COLUMNS[fmt] if c not in df.columns]
    if missing:
        raise PreferenceDataError(
            f"{where}: format '{fmt}' needs the columns {list(REQUIRED_COLUMNS[fmt])}; missing "
            f"{missing}; found {_data_columns(df)}")
    has_scores = fmt == "pairs" and ("score_chosen" in df.columns or "score_rejected" in df.columns)
    if has_scores and not {"score_chosen", "score_rejected"} <= set(df.columns):
        raise PreferenceDataError(f"{where}: give both score_chosen and score_rejected, or neither")

    needed = list(REQUIRED_COLUMNS[fmt]) + (["score_chosen", "score_rejected"] if has_scores else [])
    col_values = {c: df[c].tolist() for c in needed}
    files, rows = df[SOURCE_FILE].tolist(), df[SOURCE_ROW].tolist()
    parse = {"pairs": lambda r: parse_pairs_row(r, has_scores), "hh": parse_hh_row,
             "scored": parse_scored_row}[fmt]

    out: dict[str, list] = {c: [] for c in GROUP_COLUMNS}
    dropped: list[tuple] = []
    first_seen: dict[str, int] = {}
    for i in range(len(df)):
        record = {c: col_values[c][i] for c in needed}
        try:
            g = parse(record)
            gid = group_id(g.prompt, g.responses)
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
        out["source_file"].append(files[i])
        out["source_row"].append(int(rows[i]))
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


def groups_to_pairs(groups: pd.DataFrame, rejected: str = "worst", seed: int = 0) -> pd.DataFrame:
    """One preference pair per group.

    Labelled pairs keep their label (response 0 chosen, even when scores tie). Scored groups:
    chosen = best-scored response; rejected = the worst-scored one (``'worst'``) or a seeded random
    response scored below the best (``'random'``, as in the RPO paper). Scored groups whose
    responses all tie carry no preference and yield no pair.
    """
    if rejected not in ("worst", "random"):
        raise ValueError(f"rejected must be 'worst' or 'random', got {rejected!r}")
    recs = []
    for row in groups.itertuples(index=False):
        responses = list(row.responses)
        scores = None if row.scores is None else [float(s) for s in row.scores]
        if row.labeled_pair or scores is None:
            ci, ri = 0, 1
        else:
            ci = max(range(len(scores)), key=lambda k: (scores[k], -k))
            lower = [k for k in range(len(scores)) if scores[k] < scores[ci]]
            if not lower:
                continue
            if rejected == "worst":
                ri = min(lower, key=lambda k: (scores[k], k))
            else:
                ri = random.Random(f"{seed}:{row.group_id}").choice(lower)
        recs.append({
            "group_id": row.group_id, "prompt": row.prompt, "chosen": responses[ci],
            "rejected": responses[ri], "chosen_index": ci, "rejected_index": ri,
            "score_chosen": None if scores is None else scores[ci],
            "score_rejected": None if scores is None else scores[ri],
            **({"split": row.split} if "split" in groups.columns else {}),
        })
    return pd.DataFrame.from_records(recs)


def write_jsonl(records: Iterable[dict], path: str) -> None:
    """Write records as JSON lines (gzip when the path ends in .gz)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
