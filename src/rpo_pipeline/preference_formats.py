"""Preference data formats: detect the format of raw rows, parse and validate each row into a group.

Kedro-free (file reading is ``datasets.preference_file``; groups, pairs and the split are
``preference_groups``). Three input formats are accepted:

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

import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

FORMATS = ("pairs", "hh", "scored", "prompts", "text")
SOURCE_FILE, SOURCE_ROW = "_source_file", "_source_row"
READ_ERROR = "_read_error"  # why a raw row could not be read (bad UTF-8 or JSON); None if it could
HH_ASSISTANT = "\n\nAssistant:"
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


def file_formats(df: pd.DataFrame, fmt: str) -> dict[str, tuple[str, bool]]:
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

