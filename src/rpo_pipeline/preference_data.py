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

FORMATS = ("pairs", "hh", "scored", "prompts", "text")
SOURCE_FILE, SOURCE_ROW = "_source_file", "_source_row"
READ_ERROR = "_read_error"  # why a raw row could not be read (bad UTF-8 or JSON); None if it could
HH_ASSISTANT = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"
_FORMAT_HELP = (
    "pairs (prompt, chosen, rejected[, score_chosen, score_rejected]), "
    "hh (chosen, rejected: full '\\n\\nHuman: ... \\n\\nAssistant: ...' transcripts), "
    "scored (prompt, responses, scores), "
    "prompts (prompt only: responses are generated later), "
    "text (a raw corpus: the first words of each text are the prompt, the rest its SFT target)"
)


class PreferenceDataError(ValueError):
    """Bad preference data: the message names the file, the row and the reason."""


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz"}


def _decompress(raw: bytes, kind: str, path: str) -> bytes:
    """Decompress ``raw`` (all members); a truncated or corrupt stream fails naming how far it was
    readable."""
    import bz2
    import lzma
    import zlib

    make = {"gzip": lambda: zlib.decompressobj(wbits=31), "bz2": bz2.BZ2Decompressor,
            "xz": lzma.LZMADecompressor}[kind]
    out, data = bytearray(), raw
    try:
        while data:
            d = make()
            out += d.decompress(data)
            if not d.eof:
                raise EOFError("the stream ends before its end marker")
            data = d.unused_data.lstrip(b"\x00")  # next member (concatenated files), or padding
    except (EOFError, OSError, ValueError, zlib.error, lzma.LZMAError) as e:
        lines = out.count(b"\n")
        raise PreferenceDataError(
            f"{path}: the {kind} data is truncated or corrupt ({e}); it broke off after "
            f"{len(out)} decompressed bytes ({lines} complete lines). Re-download or re-compress "
            "the file") from None
    return bytes(out)


def _utf8_reason(data: bytes, e: UnicodeDecodeError, base: int = 0) -> str:
    """A UTF-8 error of ``data`` (which starts at byte ``base`` of the decompressed file)."""
    return (f"not valid UTF-8 at byte offset {base + e.start} ({data[e.start:e.start + 4]!r}); "
            "save the file as UTF-8")


def _read_jsonl(raw: bytes) -> tuple[list[dict], list[int], list[str | None]]:
    """Records, their line numbers, and per line the reason it could not be read (or None).

    A line that is not UTF-8, not JSON, cut off mid-value or not an object is a row-level problem:
    ``ingest`` raises on it or drops and reports it (``on_invalid``), like any invalid row.
    """
    records, rows, errors = [], [], []
    offset = 0
    for lineno, line in enumerate(raw.splitlines(keepends=True), start=1):
        start, offset = offset, offset + len(line)
        if not line.strip():
            continue
        record, error = {}, None
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            error = _utf8_reason(line, e, base=start)
        else:
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                if text.rstrip().endswith("}"):
                    error = f"invalid JSON ({e.msg}, column {e.colno})"
                else:  # an object that never closes: the line was cut
                    end = " at the end of the file: truncated?" if not line.endswith(b"\n") else ""
                    error = (f"the line is cut off in the middle of its JSON "
                             f"({e.msg.removesuffix(' starting at')}){end}")
            else:
                if isinstance(value, dict):
                    record = value
                else:
                    error = f"expected a JSON object, got {type(value).__name__}"
        records.append(record)
        rows.append(lineno)
        errors.append(error)
    return records, rows, errors


def read_preference_file(path: str, file_format: str | None = None) -> pd.DataFrame:
    """Read one jsonl / json / parquet / csv file (gzip, bz2 or xz or not; local path or fsspec URL).

    Adds ``_source_file`` and ``_source_row`` (1-based: the line for jsonl, the element for a JSON
    array, the data row for csv and parquet) so that errors can point at the input. jsonl lines
    that cannot be read carry the reason in ``_read_error`` (see ``_read_jsonl``); every other
    problem (empty file, corrupt compression, bad UTF-8 or JSON in a json/csv file, an unreadable
    Parquet file) raises ``PreferenceDataError`` naming the file, the line and the reason.
    """
    stem, ext_c = os.path.splitext(path)
    compression = COMPRESSIONS.get(ext_c.lower())
    if compression is None:
        stem = path
    ext = (file_format or os.path.splitext(stem)[1].lstrip(".")).lower()
    if ext not in ("jsonl", "ndjson", "json", "parquet", "csv", "tsv"):
        raise PreferenceDataError(f"{path}: unsupported file type '{ext}'; use jsonl, json, parquet or "
                                  "csv (optionally .gz, .bz2 or .xz)")
    with fsspec.open(path, "rb") as f:
        raw = f.read()
    if compression is not None:
        raw = _decompress(raw, compression, path)
    if not raw.strip():
        raise PreferenceDataError(f"{path}: the file is empty")
    read_errors = None
    if ext in ("jsonl", "ndjson"):
        records, rows, read_errors = _read_jsonl(raw)
        df = pd.DataFrame(records)  # one row per non-blank line, also when none could be read
    elif ext == "parquet":
        try:
            df = pd.read_parquet(io.BytesIO(raw))
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise PreferenceDataError(f"{path}: not a readable Parquet file ({type(e).__name__}: "
                                      f"{e})") from None
        rows = list(range(1, len(df) + 1))
    else:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise PreferenceDataError(f"{path}: line {line}: {_utf8_reason(raw, e)}") from None
        if ext == "json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                cut = ("" if text.rstrip().endswith(("]", "}")) else
                       " (the file ends in the middle of a value: truncated?)")
                raise PreferenceDataError(f"{path}: line {e.lineno}, column {e.colno}: invalid JSON "
                                          f"({e.msg}){cut}") from None
            if isinstance(data, dict):  # {"data": [...]}: a single list of records inside an object
                lists = [v for v in data.values() if isinstance(v, list)]
                data = lists[0] if len(lists) == 1 else data
            if not isinstance(data, list):
                raise PreferenceDataError(f"{path}: expected a JSON array of objects, got "
                                          f"{type(data).__name__}")
            bad = next((i for i, r in enumerate(data) if not isinstance(r, dict)), None)
            if bad is not None:
                raise PreferenceDataError(f"{path}: row {bad + 1}: expected a JSON object, got "
                                          f"{type(data[bad]).__name__}")
            df, rows = pd.DataFrame.from_records(data), list(range(1, len(data) + 1))
        else:
            try:
                df = pd.read_csv(io.StringIO(text), sep="\t" if ext == "tsv" else ",",
                                 keep_default_na=False, na_values=[""], dtype=object)
            except pd.errors.ParserError as e:
                raise PreferenceDataError(f"{path}: not valid {ext.upper()} ({e})") from None
            rows = list(range(1, len(df) + 1))
    if not len(df):
        raise PreferenceDataError(f"{path}: the file has no rows")
    df[SOURCE_FILE] = path
    df[SOURCE_ROW] = rows
    if read_errors is not None and any(e is not None for e in read_errors):
        df[READ_ERROR] = read_errors
    return df


def read_preference_files(pattern: str, file_format: str | None = None) -> pd.DataFrame:
    """Read every file matching ``pattern`` (a path, a glob, or an fsspec URL) into one table."""
    if "://" in pattern:
        paths = [pattern]
    elif glob.has_magic(pattern):
        paths = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
        if not paths:
            folder = os.path.dirname(pattern) or "."
            where = (f"the folder {folder} exists" if os.path.isdir(folder)
                     else f"the folder {folder} does not exist")
            raise PreferenceDataError(f"{pattern}: no file matches this glob ({where}; the path is "
                                      f"relative to {os.getcwd()})")
    else:
        if os.path.isdir(pattern):
            raise PreferenceDataError(f"{pattern}: is a folder; give a file or a glob such as "
                                      f"{os.path.join(pattern, '*.jsonl')}")
        if not os.path.exists(pattern):
            raise PreferenceDataError(f"{pattern}: no such file (relative to {os.getcwd()})")
        paths = [pattern]
    frames = [read_preference_file(p, file_format) for p in paths]
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


# --------------------------------------------------------------------------------------------------
# Columns and format detection
# --------------------------------------------------------------------------------------------------
def _data_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c not in (SOURCE_FILE, SOURCE_ROW, READ_ERROR)]


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
    if "prompt" in cols:
        return "prompts"
    if "text" in cols:
        return "text"
    raise PreferenceDataError(
        f"{source}: cannot detect the preference format from the columns {sorted(cols)}; "
        f"supported formats: {_FORMAT_HELP}")


REQUIRED_COLUMNS = {"pairs": ("prompt", "chosen", "rejected"), "hh": ("chosen", "rejected"),
                    "scored": ("prompt", "responses", "scores"), "prompts": ("prompt",),
                    "text": ("text",)}


def _first(df: pd.DataFrame, col: str) -> Any:
    if col not in df.columns:
        return None
    values = df[col].dropna()
    return values.iloc[0] if len(values) else None


def _is_sharegpt_message(v: Any) -> bool:
    if isinstance(v, list | np.ndarray) and len(v):
        v = v[0]
    return isinstance(v, dict) and "from" in v and "value" in v


def unsupported_layout(df: pd.DataFrame) -> str | None:
    """Name and fix of a known layout the project does not read, if ``df`` (one file) has one."""
    cols = set(_data_columns(df))
    prompt = _first(df, "prompt")
    if "conversations" in cols or _is_sharegpt_message(_first(df, "chosen")):
        return ("ShareGPT / LLaMA-Factory pairs (`conversations`, `chosen`, `rejected` as {from, value} "
                "messages). Convert each row to the pairs format: prompt = the conversation as "
                "{role, content} messages (from human -> role user, gpt -> assistant), chosen = "
                "chosen.value, rejected = rejected.value")
    if "message_tree_id" in cols or (isinstance(prompt, dict) and "replies" in prompt):
        return ("OpenAssistant message trees (`prompt` with nested `replies`). Flatten each tree into "
                "the scored format: one row per prompter message with its ranked sibling replies as "
                "`responses` and scores from their ranks")
    if "messages" in cols and not {"chosen", "rejected"} & cols:
        return ("chat transcripts (`messages`) without preferences: SFT data, not preference data")
    if {"instruction", "output"} <= cols and "chosen" not in cols:
        return "Alpaca-style instruction data (`instruction`, `output`): SFT data, not preference data"
    return None


def _file_formats(df: pd.DataFrame, fmt: str) -> dict[str, tuple[str, bool]]:
    """Per source file: (format, has scores), from the columns that file fills; every file checked
    against its known-but-unsupported layouts and, for an explicit ``fmt``, its required columns."""
    out = {}
    for file, part in df.groupby(SOURCE_FILE, sort=False):
        layout = unsupported_layout(part)
        if layout is not None:
            raise PreferenceDataError(f"{file}: looks like {layout}. Supported formats: {_FORMAT_HELP}")
        cols = [c for c in _data_columns(part) if part[c].notna().any()]
        file_fmt = detect_format(cols, str(file)) if fmt == "auto" else fmt
        missing = [c for c in REQUIRED_COLUMNS[file_fmt] if c not in cols]
        if missing:
            raise PreferenceDataError(
                f"{file}: format '{file_fmt}' needs the columns {list(REQUIRED_COLUMNS[file_fmt])}; "
                f"missing {missing}; found {sorted(cols)}")
        scores = file_fmt == "pairs" and bool({"score_chosen", "score_rejected"} & set(cols))
        if scores and not {"score_chosen", "score_rejected"} <= set(cols):
            raise PreferenceDataError(f"{file}: give both score_chosen and score_rejected, or neither")
        out[str(file)] = (file_fmt, scores)
    return out


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
    sft_target: str | None = None  # format text: the continuation SFT learns (no preference)


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


def parse_prompts_row(row: dict[str, Any]) -> Group:
    """A prompt with no responses yet (``generate_preferences`` samples and judges them)."""
    return Group(_text(row["prompt"], "prompt"), [], None, labeled_pair=False)


_WORD_END = re.compile(r"\S+")


def prompt_word_count(text: str, prompt_words: tuple[int, int], seed: int) -> int:
    """N in [lo, hi], drawn from a seeded hash of the text: the same text gets the same N whatever
    the file's row order."""
    lo, hi = prompt_words
    digest = hashlib.blake2b(f"{seed}\x00{text}".encode(), digest_size=8).digest()
    return lo + int.from_bytes(digest, "little") % (hi - lo + 1)


def parse_text_row(row: dict[str, Any], prompt_words: tuple[int, int], seed: int) -> Group:
    """Raw text -> prompt (its first N words, N seeded per text; the DPO paper's IMDb setting uses
    2-8 tokens) and SFT target (the rest, spacing kept; cut to ``max_length`` when tokenized)."""
    text = _text(row["text"], "text").strip()
    words = list(_WORD_END.finditer(text))
    n = prompt_word_count(text, prompt_words, seed)
    if len(words) <= n:
        raise RowError(f"text has {len(words)} words; the prompt takes {n} "
                       f"(data_processing.prompt_words {list(prompt_words)}) and leaves no continuation")
    cut = words[n - 1].end()
    return Group(text[:cut], [], None, labeled_pair=False, sft_target=text[cut:].strip())


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
    formats = _file_formats(df[readable_rows], fmt)
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
        if len(responses) < 2:  # prompt-only and text groups: nothing to prefer (yet)
            continue
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
    return pd.DataFrame.from_records(recs, columns=PAIR_COLUMNS
                                     + (["split"] if "split" in groups.columns else []))


def write_jsonl(records: Iterable[dict], path: str) -> None:
    """Write records as JSON lines (gzip when the path ends in .gz)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
