"""Template, chat template, tokenization boundary and truncation."""

from __future__ import annotations

import pandas as pd
import pytest
from helpers import DEFAULT_DATA, shared_file

from rpo_pipeline.base_model import train_bpe_tokenizer
from rpo_pipeline.datasets import read_preference_files
from rpo_pipeline.preference_groups import assign_splits, ingest
from rpo_pipeline.text_format import (
    SEED_TEMPLATE,
    Template,
    format_groups,
    format_prompts,
    format_sft_targets,
    tokenize_examples,
    tokenize_prompts,
)


@pytest.fixture(scope="module")
def default_groups():
    groups = ingest(read_preference_files(str(DEFAULT_DATA))).groups
    return assign_splits(groups, {"train": 0.8, "val": 0.1, "test": 0.1}, 42)


@pytest.fixture(scope="module")
def tokenizer(default_groups):
    texts = [t for r in default_groups.itertuples() for t in [r.prompt, *r.responses]]
    return train_bpe_tokenizer(["prompt : [SEP] response :"] * 10 + texts, vocab_size=2048)


def test_seed_template_renders_exactly():
    p, r = Template.parse(SEED_TEMPLATE).render("The movie", "was great.")
    assert p + r == "prompt : The movie [SEP] response : was great."
    assert (p, r) == ("prompt : The movie [SEP] response :", " was great.")


@pytest.mark.parametrize("bad", ["{prompt} only", "{response} then {prompt}", "{prompt} {response} {x}"])
def test_bad_templates_fail(bad):
    with pytest.raises(ValueError, match="template must"):
        Template.parse(bad)


def test_format_groups_one_row_per_response(default_groups):
    ex = format_groups(default_groups.head(3))
    assert len(ex) == 12 and ex["response_index"].tolist()[:4] == [0, 1, 2, 3]
    first = default_groups.iloc[0]
    assert ex.iloc[1]["prompt_text"] + ex.iloc[1]["response_text"] == SEED_TEMPLATE.format(
        prompt=first["prompt"], response=first["responses"][1])


def _assert_boundary_stable(tokenizer, examples):
    tok = tokenize_examples(examples, tokenizer, 4096, 8192, add_eos=False)
    joint = tokenizer((examples["prompt_text"] + examples["response_text"]).tolist(),
                      add_special_tokens=False, verbose=False)["input_ids"]
    mismatched = [i for i, (a, b) in enumerate(zip(tok["input_ids"], joint, strict=True))
                  if list(a) != list(b)]
    assert not mismatched, f"{len(mismatched)} boundary shifts, e.g. row {mismatched[:3]}"
    return tok


def test_boundary_does_not_shift_on_default_data(default_groups, tokenizer):
    """Tokenizing prompt and response separately == tokenizing prompt+response (all 10 200)."""
    tok = _assert_boundary_stable(tokenizer, format_groups(default_groups))
    assert (tok["response_start"] > 0).all()


def test_boundary_does_not_shift_on_hh(tokenizer):
    path = shared_file("hh_rlhf/helpful-base_test.jsonl.gz")
    groups = ingest(read_preference_files(str(path)), on_invalid="drop").groups.head(500)
    _assert_boundary_stable(tokenizer, format_groups(groups))


def test_response_tokens_decode_to_response(default_groups, tokenizer):
    ex = format_groups(default_groups.head(5))
    tok = tokenize_examples(ex, tokenizer, 64, 128)
    for (_, e), (_, t) in zip(ex.iterrows(), tok.iterrows(), strict=True):
        resp = tokenizer.decode(t["input_ids"][t["response_start"]:])
        assert resp == e["response_text"] + tokenizer.eos_token
        assert tokenizer.decode(t["input_ids"][:t["response_start"]]) == e["prompt_text"]


def test_truncation_keeps_prompt_end_and_response_start(tokenizer):
    ex = pd.DataFrame({"group_id": ["g", "g"], "response_index": [0, 1], "split": ["train"] * 2,
                       "prompt_text": ["one two three four five six seven eight nine ten", "short"],
                       "response_text": [" alpha beta gamma delta", " a b c d e f g h i j k l"]})
    full = tokenize_examples(ex, tokenizer, 100, 200)
    tok = tokenize_examples(ex, tokenizer, 4, 8)
    long_p = full.iloc[0]["input_ids"][:full.iloc[0]["response_start"]]
    assert list(tok.iloc[0]["input_ids"][:4]) == list(long_p[-4:])  # prompt keeps its end
    assert tok["prompt_truncated"].tolist() == [True, False]
    assert tok["response_truncated"].tolist() == [True, True]
    assert tok["length"].max() == 8
    r1 = full.iloc[1]
    assert list(tok.iloc[1]["input_ids"]) == list(r1["input_ids"][:8])  # response keeps its start
    assert tok.iloc[1]["response_start"] == r1["response_start"]
    with pytest.raises(ValueError, match="max_prompt_length"):
        tokenize_examples(ex, tokenizer, 8, 8)


CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_chat_template(tokenizer, default_groups):
    import copy

    tok = copy.deepcopy(tokenizer)
    hh = ingest(pd.DataFrame([{"chosen": "\n\nHuman: hi\n\nAssistant: a\n\nHuman: more?\n\nAssistant: yes",
                               "rejected": "\n\nHuman: hi\n\nAssistant: a\n\nHuman: more?\n\nAssistant: no"}])).groups
    with pytest.raises(ValueError, match="has no chat template"):
        format_groups(hh, use_chat_template=True, tokenizer=tok)
    tok.chat_template = CHAT
    ex = format_groups(hh, use_chat_template=True, tokenizer=tok)
    eos = tok.eos_token
    assert ex.iloc[0]["prompt_text"] == (f"<|user|>hi{eos}<|assistant|>a{eos}<|user|>more?{eos}"
                                         "<|assistant|>")
    assert ex["response_text"].tolist() == [f"yes{eos}", f"no{eos}"]
    single = format_groups(default_groups.head(1), use_chat_template=True, tokenizer=tok)
    assert single.iloc[0]["prompt_text"].startswith(f"<|user|>{default_groups.iloc[0]['prompt']}")


def test_prompt_tokens_equal_the_prompt_part_of_every_response_row(default_groups, tokenizer):
    groups = default_groups.assign(split="train")
    tok = tokenize_examples(format_groups(groups), tokenizer, 6, 128)  # 6: some prompts truncated
    prompts = tokenize_prompts(format_prompts(groups), tokenizer, 6)
    assert len(prompts) == len(groups) and prompts["prompt_truncated"].any()
    by_group = dict(zip(prompts["group_id"], prompts["prompt_ids"], strict=True))
    for ids, start, gid in zip(tok["input_ids"], tok["response_start"], tok["group_id"], strict=True):
        assert list(ids[:start]) == list(by_group[gid])


def test_sft_targets_tokenize_as_responses_with_index_minus_one(tokenizer):
    groups = pd.DataFrame({"group_id": ["a", "b"], "prompt": ["I loved", "Terrible"],
                           "prompt_messages": [None, None], "responses": [[], ["x", "y"]],
                           "sft_target": ["this film a lot", None], "split": ["train", "val"]})
    ex = format_sft_targets(groups)
    assert ex[["group_id", "response_index"]].values.tolist() == [["a", -1]]
    tok = tokenize_examples(ex, tokenizer, 64, 128)
    assert tokenizer.decode(tok["input_ids"][0][tok["response_start"][0]:]) == \
        " this film a lot" + tokenizer.eos_token
    assert tokenize_examples(ex.iloc[:0], tokenizer, 64, 128).empty
