"""rpo_pipeline.preference_formats: each input format parsed into groups, format detection, rows
that do not fit their format."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from rpo_pipeline.preference_formats import PreferenceDataError, detect_format
from rpo_pipeline.preference_groups import ingest

QA_PAIRS = [
    {"prompt": "Is the sky blue?", "chosen": "Yes, on a clear day.", "rejected": "No."},
    {"prompt": "Name a fruit.", "chosen": "An apple.", "rejected": "A chair."},
]

# ---- prompt-only and raw-text data (issue 14) ---------------------------------------------------
TEXTS = ["This movie was a slow burn but the ending paid off in every way.",
         "I could not stop laughing , the cast is wonderful and the script sharp .",
         "Terrible   sound, worse acting; skip it unless you enjoy pain and boredom."]


def test_pairs_plain():
    res = ingest(pd.DataFrame(QA_PAIRS))
    assert res.format == "pairs"
    assert res.groups["responses"].tolist() == [["Yes, on a clear day.", "No."],
                                                ["An apple.", "A chair."]]
    assert res.groups["scores"].isna().all()
    assert res.groups["labeled_pair"].all()


def test_pairs_with_scores():
    rows = [dict(r, score_chosen=8.0, score_rejected=3.5) for r in QA_PAIRS]
    res = ingest(pd.DataFrame(rows))
    assert res.groups["scores"].tolist() == [[8.0, 3.5], [8.0, 3.5]]


def test_pairs_scores_inside_metadata_dict():
    """UltraFeedback keeps scores in a `metadata` dict; they are found without configuration."""
    rows = [dict(r, metadata={"score_chosen": 9, "score_rejected": 2}) for r in QA_PAIRS]
    res = ingest(pd.DataFrame(rows))
    assert res.groups["scores"].tolist() == [[9.0, 2.0], [9.0, 2.0]]
    res2 = ingest(pd.DataFrame([dict(r, meta={"a": 7, "b": 1}) for r in QA_PAIRS]),
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
