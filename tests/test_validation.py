"""Every validation reason, under both policies: raise names file/row/reason; drop reports it."""

from __future__ import annotations

import math
import re

import pytest

from rpo_pipeline.preference_data import (
    PreferenceDataError,
    ingest,
    read_preference_files,
    write_jsonl,
)

GOOD = {
    "pairs": [{"prompt": "p1", "chosen": "good", "rejected": "bad"},
              {"prompt": "p3", "chosen": "yes", "rejected": "no"}],
    "scored": [{"prompt": "p1", "responses": ["a", "b"], "scores": [1.0, 0.0]},
               {"prompt": "p3", "responses": ["c", "d", "e"], "scores": [0.1, 0.2, 0.3]}],
    "hh": [{"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go"},
           {"chosen": "\n\nHuman: yo\n\nAssistant: hey", "rejected": "\n\nHuman: yo\n\nAssistant: no"}],
}
SCORED_PAIR = {"prompt": "p2", "chosen": "c", "rejected": "r", "score_chosen": 1.0,
               "score_rejected": 0.0}

CASES = [
    # (format, bad row at position 2, reason pattern)
    ("pairs", {"prompt": None, "chosen": "c", "rejected": "r"}, r"missing value in 'prompt'"),
    ("pairs", {"prompt": "p2", "chosen": 42, "rejected": "r"}, r"'chosen' is int, expected a string"),
    ("pairs", {"prompt": "p2", "chosen": "c", "rejected": "   "}, r"'rejected' is empty or whitespace"),
    ("pairs", {"prompt": "", "chosen": "c", "rejected": "r"}, r"'prompt' is empty or whitespace"),
    ("pairs", {"prompt": "p2", "chosen": "same", "rejected": "same"}, r"chosen and rejected are identical"),
    ("pairs", {**SCORED_PAIR, "score_chosen": math.nan}, r"'score_chosen' is missing or NaN"),
    ("pairs", {**SCORED_PAIR, "score_rejected": "high"}, r"'score_rejected' is 'high', expected a number"),
    ("pairs", {**SCORED_PAIR, "score_chosen": -1.0}, r"score_chosen -1 < score_rejected 0"),
    ("pairs", {"prompt": "p1", "chosen": "good", "rejected": "bad"}, r"duplicate of row 1"),
    ("pairs", {"prompt": [{"role": "user"}], "chosen": [{"role": "assistant", "content": "x"}],
               "rejected": [{"role": "assistant", "content": "y"}]},
     r"'prompt\[0\]' is not a \{role, content\} message"),
    ("scored", {"prompt": "p2", "responses": ["a", "b", "c"], "scores": [1.0, 2.0]},
     r"'responses' has 3 items but 'scores' has 2"),
    ("scored", {"prompt": "p2", "responses": ["a"], "scores": [1.0]}, r"needs at least 2 responses, got 1"),
    ("scored", {"prompt": "p2", "responses": ["a", " "], "scores": [1.0, 0.0]}, r"'responses\[1\]' is empty"),
    ("scored", {"prompt": "p2", "responses": ["a", "b", "a"], "scores": [1.0, 0.0, 2.0]},
     r"responses\[0\] and responses\[2\] are identical"),
    ("scored", {"prompt": "p2", "responses": ["a", "b"], "scores": [1.0, None]}, r"'scores\[1\]' is missing or NaN"),
    ("scored", {"prompt": "p2", "responses": "a", "scores": [1.0]}, r"'responses' is str, expected a list"),
    ("hh", {"chosen": "Human: hi Assistant: a", "rejected": "Human: hi Assistant: b"},
     r"share no prefix ending in"),
    ("hh", {"chosen": "\n\nHuman: hi\n\nAssistant:  ", "rejected": "\n\nHuman: hi\n\nAssistant: b"},
     r"chosen response .* is empty"),
    ("hh", {"chosen": "\n\nHuman: hi\n\nAssistant: same", "rejected": "\n\nHuman: hi\n\nAssistant: same"},
     r"chosen and rejected are identical"),
]


def _write(tmp_path, fmt, bad):
    rows = [GOOD[fmt][0], bad, GOOD[fmt][1]]
    if "score_chosen" in bad:  # scores are all-or-none per file
        rows = [dict(r, score_chosen=1.0, score_rejected=0.0) for r in (rows[0], rows[2])]
        rows.insert(1, bad)
    path = tmp_path / f"{fmt}_data.jsonl"
    write_jsonl(rows, str(path))
    return path


@pytest.mark.parametrize("fmt,bad,reason", CASES)
def test_raise_names_file_row_and_reason(tmp_path, fmt, bad, reason):
    path = _write(tmp_path, fmt, bad)
    with pytest.raises(PreferenceDataError) as e:
        ingest(read_preference_files(str(path)), fmt=fmt, on_invalid="raise")
    msg = str(e.value)
    assert msg.startswith(f"{path}: row 2: "), msg
    assert re.search(reason, msg), msg


@pytest.mark.parametrize("fmt,bad,reason", CASES)
def test_drop_reports_row_and_accounts_for_it(tmp_path, fmt, bad, reason):
    path = _write(tmp_path, fmt, bad)
    res = ingest(read_preference_files(str(path)), fmt=fmt, on_invalid="drop")
    assert res.counts == {"rows_in": 3, "rows_out": 2, "rows_dropped": 1}
    assert res.groups["source_row"].tolist() == [1, 3]
    d = res.dropped.iloc[0]
    assert d["source_file"] == str(path) and d["source_row"] == 2
    assert re.search(reason, d["reason"]), d["reason"]
    assert d["record"]  # the offending row, as JSON


def test_unknown_policy_and_format_fail_fast():
    import pandas as pd

    df = pd.DataFrame(GOOD["pairs"])
    with pytest.raises(ValueError, match="on_invalid must be"):
        ingest(df, on_invalid="skip")
    with pytest.raises(ValueError, match="format must be one of"):
        ingest(df, fmt="sharegpt")


def test_raise_is_the_default_and_rows_balance_on_real_hh():
    from conftest import shared_file

    path = shared_file("hh_rlhf/harmless-base_test.jsonl.gz")
    raw = read_preference_files(str(path))
    with pytest.raises(PreferenceDataError, match=r"harmless-base_test.jsonl.gz: row \d+: "):
        ingest(raw)
    res = ingest(raw, on_invalid="drop")
    assert res.rows_in == 2312 == len(res.groups) + len(res.dropped)
    assert 0 < len(res.dropped) < 50
