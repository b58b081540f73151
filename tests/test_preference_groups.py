"""rpo_pipeline.preference_groups: ingestion (invalid rows raise naming file, row and reason, or are
dropped and counted: rows in = rows out + rows dropped), the split by prompt, pairs from groups."""

from __future__ import annotations

import math
import re

import pandas as pd
import pytest
from helpers import DEFAULT_DATA, PAIRS, fails, jsonl, load, write_file

from rpo_pipeline.datasets import read_preference_files, write_jsonl
from rpo_pipeline.preference_formats import PreferenceDataError
from rpo_pipeline.preference_groups import assign_splits, groups_to_pairs, ingest

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

def _write_rows(tmp_path, fmt, bad):
    rows = [GOOD[fmt][0], bad, GOOD[fmt][1]]
    if "score_chosen" in bad:  # scores are all-or-none per file
        rows = [dict(r, score_chosen=1.0, score_rejected=0.0) for r in (rows[0], rows[2])]
        rows.insert(1, bad)
    path = tmp_path / f"{fmt}_data.jsonl"
    write_jsonl(rows, str(path))
    return path

# ---- file-level problems: the same error under either policy -------------------------------------
# ---- row-level problems: raise names file and row; drop counts and reports them ------------------
ROW_CASES = [
    (b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n',
     r"row 3: not valid UTF-8 at byte offset \d+ \(b'\\xe9\", '\); save the file as UTF-8"),
    (b'{"prompt": "p", "chosen": "a", "rejec\n', r"row 3: the line is cut off in the middle of its JSON"),
    (b'{"prompt": "p", "chosen": "a" "rejected": "b"}\n', r"row 3: invalid JSON \(Expecting ',' delimiter"),
    (b'["prompt", "chosen"]\n', r"row 3: expected a JSON object, got list"),
    (b'{"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": NaN, "score_rejected": 0}\n',
     r"row 3: 'score_chosen' is missing or NaN"),
    (b'{"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": Infinity, "score_rejected": 0}\n',
     r"row 3: 'score_chosen' is infinite"),
    (b'{"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": 1, "score_rejected": -1e999}\n',
     r"row 3: 'score_rejected' is infinite"),
]

FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}

def _groups_with_repeated_prompts(n=600):
    rows = [{"prompt": f"prompt {i % 200}", "chosen": f"good {i}", "rejected": f"bad {i}"}
            for i in range(n)]
    return ingest(pd.DataFrame(rows)).groups

def _scored(scores):
    rows = [{"prompt": f"p{i}", "responses": [f"r{i}_{k}" for k in range(len(s))], "scores": s}
            for i, s in enumerate(scores)]
    return ingest(pd.DataFrame(rows)).groups


@pytest.mark.parametrize("fmt,bad,reason", CASES)
def test_raise_names_file_row_and_reason(tmp_path, fmt, bad, reason):
    path = _write_rows(tmp_path, fmt, bad)
    with pytest.raises(PreferenceDataError) as e:
        ingest(read_preference_files(str(path)), fmt=fmt, on_invalid="raise")
    msg = str(e.value)
    assert msg.startswith(f"{path}: row 2: "), msg
    assert re.search(reason, msg), msg


@pytest.mark.parametrize("fmt,bad,reason", CASES)
def test_drop_reports_row_and_accounts_for_it(tmp_path, fmt, bad, reason):
    path = _write_rows(tmp_path, fmt, bad)
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
    from helpers import shared_file

    path = shared_file("hh_rlhf/harmless-base_test.jsonl.gz")
    raw = read_preference_files(str(path))
    with pytest.raises(PreferenceDataError, match=r"harmless-base_test.jsonl.gz: row \d+: "):
        ingest(raw)
    res = ingest(raw, on_invalid="drop")
    assert res.rows_in == 2312 == len(res.groups) + len(res.dropped)
    assert 0 < len(res.dropped) < 50


def test_files_of_different_formats_under_one_glob(tmp_path):
    write_file(tmp_path, "a_pairs.jsonl", jsonl(PAIRS[:3]))
    write_file(tmp_path, "b_scored.jsonl", jsonl([{"prompt": "q", "responses": ["x", "y"], "scores": [1.0, 0.0]}]))
    write_file(tmp_path, "c_scored_pairs.jsonl", jsonl([{**PAIRS[5], "score_chosen": 2.0, "score_rejected": 1.0}]))
    message = fails(tmp_path / "*.jsonl")
    assert message.startswith("files of different formats under one path:")
    for part in ("a_pairs.jsonl: pairs;", "b_scored.jsonl: scored;", "c_scored_pairs.jsonl: pairs with scores"):
        assert part in message, message
    # an explicit format names the file that lacks its columns
    with pytest.raises(PreferenceDataError, match=r"b_scored.jsonl: format 'pairs' needs the columns "
                                                  r"\['prompt', 'chosen', 'rejected'\]; missing \['chosen', "):
        ingest(read_preference_files(str(tmp_path / "*.jsonl")), fmt="pairs")
    # one format across files is fine, rows from every file
    for p in tmp_path.glob("[bc]_*"):
        p.unlink()
    write_file(tmp_path, "d_pairs.jsonl", jsonl(PAIRS[3:6]))
    assert load(tmp_path / "*.jsonl").counts == {"rows_in": 6, "rows_out": 6, "rows_dropped": 0}


@pytest.mark.parametrize(("bad_line", "expected"), ROW_CASES, ids=[c[1][7:40] for c in ROW_CASES])
def test_bad_row_raises_with_file_row_reason_or_is_dropped_and_counted(tmp_path, bad_line, expected):
    scored = "score_chosen" in bad_line.decode("utf-8", "replace")
    good = [{**r, "score_chosen": 1.0, "score_rejected": 0.0} if scored else r for r in PAIRS[:4]]
    path = write_file(tmp_path, "rows.jsonl", jsonl(good[:2]) + bad_line + jsonl(good[2:]))
    message = fails(path)
    assert message.startswith(f"{path}: row 3: ") and __import__("re").search(expected, message), message

    result = load(path, "drop")
    assert result.counts == {"rows_in": 5, "rows_out": 4, "rows_dropped": 1}
    dropped = result.dropped.iloc[0]
    assert (dropped["source_file"], dropped["source_row"]) == (str(path), 3)
    assert __import__("re").search(expected.removeprefix("row 3: "), dropped["reason"])


def test_mixed_row_problems_are_all_reported(tmp_path):
    lines = (jsonl(PAIRS[:3]) + b'{"prompt": "\xff"}\n' + b"{oops}\n"
             + jsonl([{**PAIRS[3], "chosen": PAIRS[3]["rejected"]}]) + jsonl(PAIRS[:1]))
    result = load(write_file(tmp_path, "mixed.jsonl", lines), "drop")
    assert result.counts == {"rows_in": 7, "rows_out": 3, "rows_dropped": 4}
    reasons = result.dropped.set_index("source_row")["reason"].to_dict()
    assert set(reasons) == {4, 5, 6, 7}
    assert "not valid UTF-8" in reasons[4] and "invalid JSON" in reasons[5]
    assert "identical" in reasons[6] and reasons[7] == "duplicate of row 1"


def test_no_prompt_in_two_splits():
    groups = assign_splits(_groups_with_repeated_prompts(), FRACTIONS, seed=1)
    assert groups.groupby("prompt")["split"].nunique().max() == 1
    assert set(groups["split"]) == {"train", "val", "test"}


def test_split_fractions_deterministic_and_seeded():
    groups = ingest(read_preference_files(str(DEFAULT_DATA))).groups
    a = assign_splits(groups, FRACTIONS, seed=42)
    b = assign_splits(groups.sample(frac=1, random_state=0), FRACTIONS, seed=42)
    assert a.set_index("group_id")["split"].equals(b.set_index("group_id")["split"].loc[a["group_id"]])
    share = a["split"].value_counts(normalize=True)
    assert share["train"] == pytest.approx(0.8, abs=0.03)
    assert share["val"] == pytest.approx(0.1, abs=0.03)
    c = assign_splits(groups, FRACTIONS, seed=7)
    assert (a["split"] != c["split"]).mean() > 0.1


def test_default_dataset_sizes():
    """The bundled data has >= 2000 training prompts and >= 200 held-out, none repeated."""
    groups = assign_splits(ingest(read_preference_files(str(DEFAULT_DATA))).groups, FRACTIONS, 42)
    assert groups["prompt"].is_unique
    counts = groups["split"].value_counts()
    assert counts["train"] >= 2000 and counts["val"] >= 200 and counts["test"] >= 200
    assert groups["responses"].map(len).eq(4).all()


@pytest.mark.parametrize("fractions", [{"train": 0.9, "val": 0.2}, {"train": 1.2, "test": -0.2},
                                       {"train": 0.5, "dev": 0.5}])
def test_bad_fractions(fractions):
    with pytest.raises(ValueError, match="split fractions"):
        assign_splits(_groups_with_repeated_prompts(10), fractions, 0)


def test_pairs_best_vs_worst():
    pairs = groups_to_pairs(_scored([[0.1, 0.9, -0.5, 0.3]]), rejected="worst")
    p = pairs.iloc[0]
    assert (p["chosen_index"], p["rejected_index"]) == (1, 2)
    assert (p["chosen"], p["rejected"]) == ("r0_1", "r0_2")
    assert (p["score_chosen"], p["score_rejected"]) == (0.9, -0.5)


def test_pairs_random_rejected_is_seeded_and_below_best():
    groups = _scored([[0.1, 0.9, -0.5, 0.3]] * 1 + [[float(k) for k in range(6)]] * 50)
    a = groups_to_pairs(groups, rejected="random", seed=3)
    b = groups_to_pairs(groups, rejected="random", seed=3)
    c = groups_to_pairs(groups, rejected="random", seed=4)
    assert a.equals(b) and not a["rejected_index"].equals(c["rejected_index"])
    assert (a["score_rejected"] < a["score_chosen"]).all()
    assert a["rejected_index"].nunique() > 2  # not always the worst


def test_all_tied_scored_group_has_no_pair_but_labelled_pair_keeps_label():
    assert groups_to_pairs(_scored([[0.5, 0.5, 0.5]])).empty
    tied = ingest(pd.DataFrame([{"prompt": "p", "chosen": "a", "rejected": "b",
                                 "score_chosen": 3.0, "score_rejected": 3.0}])).groups
    p = groups_to_pairs(tied).iloc[0]
    assert (p["chosen"], p["rejected"]) == ("a", "b")
