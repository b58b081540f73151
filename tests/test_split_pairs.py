"""Split by prompt (no leakage) and pairs derived from groups."""

from __future__ import annotations

import pandas as pd
import pytest
from conftest import DEFAULT_DATA

from rpo_pipeline.preference_data import (
    assign_splits,
    groups_to_pairs,
    ingest,
    read_preference_files,
)

FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}


def _groups_with_repeated_prompts(n=600):
    rows = [{"prompt": f"prompt {i % 200}", "chosen": f"good {i}", "rejected": f"bad {i}"}
            for i in range(n)]
    return ingest(pd.DataFrame(rows)).groups


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


def _scored(scores):
    rows = [{"prompt": f"p{i}", "responses": [f"r{i}_{k}" for k in range(len(s))], "scores": s}
            for i, s in enumerate(scores)]
    return ingest(pd.DataFrame(rows)).groups


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
