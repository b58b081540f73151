"""Every input format and file type reaches the same canonical groups."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from rpo_pipeline.preference_data import (
    PreferenceDataError,
    detect_format,
    ingest,
    read_preference_files,
    write_jsonl,
)

PAIRS = [
    {"prompt": "Is the sky blue?", "chosen": "Yes, on a clear day.", "rejected": "No."},
    {"prompt": "Name a fruit.", "chosen": "An apple.", "rejected": "A chair."},
]


def test_pairs_plain():
    res = ingest(pd.DataFrame(PAIRS))
    assert res.format == "pairs"
    assert res.groups["responses"].tolist() == [["Yes, on a clear day.", "No."],
                                                ["An apple.", "A chair."]]
    assert res.groups["scores"].isna().all()
    assert res.groups["labeled_pair"].all()


def test_pairs_with_scores():
    rows = [dict(r, score_chosen=8.0, score_rejected=3.5) for r in PAIRS]
    res = ingest(pd.DataFrame(rows))
    assert res.groups["scores"].tolist() == [[8.0, 3.5], [8.0, 3.5]]


def test_pairs_scores_inside_metadata_dict():
    """UltraFeedback keeps scores in a `metadata` dict; they are found without configuration."""
    rows = [dict(r, metadata={"score_chosen": 9, "score_rejected": 2}) for r in PAIRS]
    res = ingest(pd.DataFrame(rows))
    assert res.groups["scores"].tolist() == [[9.0, 2.0], [9.0, 2.0]]
    res2 = ingest(pd.DataFrame([dict(r, meta={"a": 7, "b": 1}) for r in PAIRS]),
                  columns={"score_chosen": "meta.a", "score_rejected": "meta.b"})
    assert res2.groups["scores"].tolist() == [[7.0, 1.0], [7.0, 1.0]]


def test_pairs_conversational_trl_form():
    row = {
        "prompt": [{"role": "system", "content": "Be brief."},
                   {"role": "user", "content": "Capital of France?"}],
        "chosen": [{"role": "assistant", "content": "Paris."}],
        "rejected": [{"role": "assistant", "content": "Lyon."}],
    }
    g = ingest(pd.DataFrame([row])).groups.iloc[0]
    assert g["responses"] == ["Paris.", "Lyon."]
    assert json.loads(g["prompt_messages"])[1] == {"role": "user", "content": "Capital of France?"}
    assert g["prompt"] == "System: Be brief.\n\nHuman: Capital of France?\n\nAssistant:"


def test_hh_transcripts():
    prefix = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Tell me a joke."
    row = {"chosen": prefix + "\n\nAssistant: Why did the chicken cross the road?",
           "rejected": prefix + "\n\nAssistant: No."}
    res = ingest(pd.DataFrame([row]), fmt="auto")
    g = res.groups.iloc[0]
    assert res.format == "hh"
    assert g["prompt"] == prefix.strip() + "\n\nAssistant:"
    assert g["responses"] == ["Why did the chicken cross the road?", "No."]
    assert json.loads(g["prompt_messages"]) == [
        {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Tell me a joke."}]


def test_hh_responses_sharing_their_first_words():
    """The shared prefix may run into the responses; the cut is still the last Assistant turn."""
    p = "\n\nHuman: Color?\n\nAssistant:"
    g = ingest(pd.DataFrame([{"chosen": p + " I like blue.", "rejected": p + " I like mud."}]),
               fmt="hh").groups.iloc[0]
    assert g["responses"] == ["I like blue.", "I like mud."]


def test_hh_conversational_implicit_prompt():
    conv = [{"role": "user", "content": "Hi"}]
    row = {"chosen": conv + [{"role": "assistant", "content": "Hello!"}],
           "rejected": conv + [{"role": "assistant", "content": "Go away."}]}
    g = ingest(pd.DataFrame([row]), fmt="hh").groups.iloc[0]
    assert g["prompt"] == "Hi" and g["responses"] == ["Hello!", "Go away."]


def test_scored_groups():
    row = {"prompt": "The film was", "responses": ["great", "bad", "fine", "awful"],
           "scores": [0.9, -0.5, 0.2, -0.8]}
    res = ingest(pd.DataFrame([row]))
    g = res.groups.iloc[0]
    assert res.format == "scored" and g["scores"] == [0.9, -0.5, 0.2, -0.8]
    assert not g["labeled_pair"]


@pytest.mark.parametrize("columns,expected", [
    (["prompt", "chosen", "rejected"], "pairs"),
    (["prompt", "chosen", "rejected", "score_chosen", "score_rejected"], "pairs"),
    (["chosen", "rejected"], "hh"),
    (["prompt", "responses", "scores", "extra"], "scored"),
])
def test_detect_format(columns, expected):
    assert detect_format(columns) == expected


def test_undetectable_columns_list_found_and_supported():
    with pytest.raises(PreferenceDataError) as e:
        ingest(pd.DataFrame([{"question": "q", "answer": "a"}]), source="x.jsonl")
    msg = str(e.value)
    assert "['answer', 'question']" in msg
    assert "pairs" in msg and "hh" in msg and "scored" in msg


def test_forced_format_with_missing_column():
    with pytest.raises(PreferenceDataError, match=r"needs the columns .* missing \['prompt'\]"):
        ingest(pd.DataFrame([{"chosen": "a", "rejected": "b"}]), fmt="pairs")


ROWS = [
    {"prompt": "p1", "chosen": "c1", "rejected": "r1", "score_chosen": 2.0, "score_rejected": 1.0},
    {"prompt": "p2", "chosen": "c2", "rejected": "r2", "score_chosen": 5.0, "score_rejected": 0.5},
]


@pytest.mark.parametrize("name", ["d.jsonl", "d.jsonl.gz", "d.json", "d.json.gz", "d.parquet",
                                  "d.csv", "d.csv.gz"])
def test_file_types_read_the_same(tmp_path, name):
    path = tmp_path / name
    df = pd.DataFrame(ROWS)
    if ".jsonl" in name:
        write_jsonl(ROWS, str(path))
    elif ".json" in name:
        df.to_json(path, orient="records")
    elif ".parquet" in name:
        df.to_parquet(path)
    else:
        df.to_csv(path, index=False)
    raw = read_preference_files(str(path))
    assert raw["_source_row"].tolist() == [1, 2]
    groups = ingest(raw).groups
    assert groups["responses"].tolist() == [["c1", "r1"], ["c2", "r2"]]
    assert groups["scores"].tolist() == [[2.0, 1.0], [5.0, 0.5]]


def test_scored_lists_from_parquet_and_csv(tmp_path):
    rows = [{"prompt": "p", "responses": ["a", "b", "c"], "scores": [1.0, 0.0, 0.5]}]
    pd.DataFrame(rows).to_parquet(tmp_path / "s.parquet")
    pd.DataFrame([{"prompt": "p", "responses": json.dumps(["a", "b", "c"]),
                   "scores": json.dumps([1.0, 0.0, 0.5])}]).to_csv(tmp_path / "s.csv", index=False)
    for f in ("s.parquet", "s.csv"):
        g = ingest(read_preference_files(str(tmp_path / f))).groups.iloc[0]
        assert list(g["responses"]) == ["a", "b", "c"] and list(g["scores"]) == [1.0, 0.0, 0.5]


def test_glob_reads_every_file_and_keeps_its_name(tmp_path):
    write_jsonl(ROWS[:1], str(tmp_path / "a.jsonl"))
    write_jsonl(ROWS[1:], str(tmp_path / "b.jsonl.gz"))
    raw = read_preference_files(str(tmp_path / "*.jsonl*"))
    assert [p.rsplit("/", 1)[1] for p in raw["_source_file"]] == ["a.jsonl", "b.jsonl.gz"]
    assert len(ingest(raw).groups) == 2


def test_missing_file_and_bad_json_are_named(tmp_path):
    with pytest.raises(PreferenceDataError, match="nope.jsonl: no such file"):
        read_preference_files(str(tmp_path / "nope.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    with pytest.raises(PreferenceDataError, match=r"bad.jsonl: row 2: the line is cut off in the middle "
                                                  r"of its JSON"):
        ingest(read_preference_files(str(bad)))  # a row-level problem: on_invalid decides


# ---- prompt-only and raw-text data (issue 14) ---------------------------------------------------
TEXTS = ["This movie was a slow burn but the ending paid off in every way.",
         "I could not stop laughing , the cast is wonderful and the script sharp .",
         "Terrible   sound, worse acting; skip it unless you enjoy pain and boredom."]


def test_prompts_only_are_detected_and_keep_no_responses():
    res = ingest(pd.DataFrame({"prompt": ["Tell me a story.", "Name a fruit."]}))
    assert res.format == "prompts"
    assert res.groups["responses"].tolist() == [[], []]
    assert res.groups["sft_target"].isna().all() and not res.groups["labeled_pair"].any()
    with pytest.raises(PreferenceDataError, match="row 2: duplicate of row 1"):
        ingest(pd.DataFrame({"prompt": ["Same.", "Same."]}))


@pytest.mark.parametrize("words", [(2, 8), (3, 3)])
def test_text_splits_into_a_seeded_prompt_and_its_continuation(words):
    res = ingest(pd.DataFrame({"text": TEXTS, "label": [1, 1, 0]}), prompt_words=words, seed=7)
    assert res.format == "text"
    g = res.groups
    counts = [len(p.split()) for p in g["prompt"]]
    assert all(words[0] <= n <= words[1] for n in counts)
    for text, prompt, target in zip(TEXTS, g["prompt"], g["sft_target"], strict=True):
        assert text.startswith(prompt) and text.endswith(target)  # nothing lost, spacing kept
        assert text[len(prompt):].strip() == target and target
    assert g["responses"].tolist() == [[], [], []]
    # seeded per text, not per row position: reversed rows give each text the same prompt
    again = ingest(pd.DataFrame({"text": TEXTS[::-1]}), prompt_words=words, seed=7)
    assert again.groups["prompt"].tolist() == g["prompt"].tolist()[::-1]
    if words == (2, 8):  # another seed draws other lengths for at least one of the texts
        other = ingest(pd.DataFrame({"text": TEXTS}), prompt_words=words, seed=8)
        assert other.groups["prompt"].tolist() != g["prompt"].tolist()


def test_text_too_short_for_its_prompt_is_rejected_or_dropped_with_the_reason():
    df = pd.DataFrame({"text": [TEXTS[0], "Two words", "   "]})
    with pytest.raises(PreferenceDataError, match=r"row 2: text has 2 words; the prompt takes 3"):
        ingest(df, prompt_words=(3, 3))
    res = ingest(df, prompt_words=(3, 3), on_invalid="drop")
    assert res.counts == {"rows_in": 3, "rows_out": 1, "rows_dropped": 2}
    assert res.dropped["source_row"].tolist() == [2, 3]
