"""Online RPO: round prompts, sample groups, the unrolled rounds, and one round that learns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import DEFAULT_DATA, base_params

from rpo_pipeline.base_model import make_base_model
from rpo_pipeline.datasets import CheckpointDir, ModelSource, PretrainedDirDataset, read_preference_files
from rpo_pipeline.online import round_prompts, sample_groups
from rpo_pipeline.params import BaseModelParams, ParameterError, RpoOnlineParams
from rpo_pipeline.preference_groups import assign_splits, ingest
from rpo_pipeline.text_format import format_prompts, tokenize_prompts

NO_MODEL = ModelSource(None, None)  # gold_judge_model of a judge without a model (VADER)
NO_CHECKPOINTS = CheckpointDir(Path("unused"))  # rpo_online.train.checkpoint_every is 0


def _prompts(n_train: int) -> pd.DataFrame:
    return pd.DataFrame({"group_id": [f"g{i:03d}" for i in range(n_train + 2)],
                         "split": ["train"] * n_train + ["val", "test"],
                         "prompt_ids": [[i, i + 1] for i in range(n_train + 2)]})


def test_rounds_take_fresh_train_prompts_then_wrap():
    prompts = _prompts(10)
    r1, r2, r3 = (round_prompts(prompts, r, 4, seed=0)["group_id"].tolist() for r in (1, 2, 3))
    assert len(set(r1)) == len(set(r2)) == 4 and not set(r1) & set(r2)
    assert set(r1 + r2 + r3) == {f"g{i:03d}" for i in range(10)}  # 12 draws cover all 10, wrap
    assert not {"g010", "g011"} & set(r1 + r2 + r3)  # never val or test
    assert round_prompts(prompts, 1, 4, seed=0).equals(round_prompts(prompts, 1, 4, seed=0))
    assert r1 != round_prompts(prompts, 1, 4, seed=1)["group_id"].tolist()
    assert len(round_prompts(prompts, 1, 50, seed=0)) == 10  # more than there are: each once
    with pytest.raises(ValueError, match="count from 1"):
        round_prompts(prompts, 0, 4, seed=0)


def test_sample_groups_are_laid_out_like_tokenized_examples():
    prompts = pd.DataFrame({"group_id": ["a", "b"], "prompt_ids": [[1, 2], [3]]})
    out = sample_groups(prompts, [[[7, 0], [8]], [[9, 9, 0], [5]]], [[-1.0, -2.0], [-3.0, -4.0]])
    assert out[["group_id", "response_index"]].values.tolist() == [["a", 0], ["a", 1], ["b", 0],
                                                                   ["b", 1]]
    assert out["input_ids"].tolist() == [[1, 2, 7, 0], [1, 2, 8], [3, 9, 9, 0], [3, 5]]
    assert out["response_start"].tolist() == [2, 2, 1, 1]
    assert out["tokens"].tolist() == [2, 1, 3, 1] and (out["split"] == "train").all()


def test_online_rounds_need_two_samples_per_prompt():
    with pytest.raises(ParameterError, match=r"rpo_online\.sampling\.n_samples"):
        RpoOnlineParams.parse(base_params("rpo_online", {"sampling.n_samples": 1}))


def _shape_params(rounds: int, judge: str) -> dict:
    return {"rpo_online": base_params("rpo_online", {"rounds": rounds}),
            "generate_preferences": base_params("generate_preferences", {"judge": judge})}


def test_rounds_are_unrolled_in_order_without_cycles():
    from kedro.framework.project import pipelines

    from rpo_pipeline.pipeline_registry import PIPELINES_MODULE, configure_run_shape, register_pipelines, run_shape

    before = run_shape()
    pipelines.configure(PIPELINES_MODULE)
    try:
        for rounds in (1, 3):
            configure_run_shape(_shape_params(rounds, "gold"))
            assert len([n for n in pipelines["rpo_online"].nodes  # Kedro's pipelines rebuilt
                        if n.name.endswith(".train_round")]) == rounds
            online = register_pipelines()["rpo_online"]
            names = [n.name for n in online.nodes]  # topologically sorted: fails on a cycle
            mine = [n for n in names if n.startswith("rpo_online.round_")]
            expected = [f"rpo_online.round_{r}.{step}" for r in range(1, rounds + 1)
                        for step in ("sample_round", "label_round", "train_round")]
            assert sorted(mine) == sorted(expected)
            assert [names.index(f"rpo_online.round_{r}.train_round") for r in range(1, rounds + 1)] \
                == sorted(names.index(f"rpo_online.round_{r}.train_round")
                          for r in range(1, rounds + 1))
            assert "rpo_online.policy_model" in online.all_outputs()
            by_name = {n.name: n for n in online.nodes}
            first = by_name["rpo_online.round_1.sample_round"]
            assert "sft_model" in first.inputs
            for r in range(2, rounds + 1):
                assert f"rpo_online.round_{r - 1}.policy_model" in \
                    by_name[f"rpo_online.round_{r}.train_round"].inputs
            last = by_name[f"rpo_online.round_{rounds}.train_round"]
            assert "rpo_online.policy_model" in last.outputs
    finally:
        configure_run_shape(_shape_params(before["rounds"], before["judge"]))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random GPT-2, its tokenizer and a 4-bit reward model on it (untrained head: any
    fixed reward function will do to check that a round climbs it), saved to disk."""
    from rpo_pipeline.reward_model import RewardModel, RewardModelConfig

    root = tmp_path_factory.mktemp("online")
    groups = ingest(read_preference_files(str(DEFAULT_DATA))).groups.head(200)
    groups = assign_splits(groups, {"train": 0.8, "val": 0.1, "test": 0.1}, 0)
    texts = [t for r in groups.itertuples() for t in [r.prompt, *r.responses]]
    base = BaseModelParams.parse(base_params("base_model", {
        "tokenizer.vocab_size": 512, "model": {"n_layer": 2, "n_embd": 64, "n_head": 2,
                                               "n_positions": 96, "activation_function": "gelu_pytorch_tanh"}}))
    model, tok = make_base_model(base, ["prompt : [SEP] response :"] * 20 + texts)
    PretrainedDirDataset(filepath=str(root / "policy")).save(model)
    PretrainedDirDataset(filepath=str(root / "tokenizer"), load_class="transformers.AutoTokenizer").save(tok)
    rm = RewardModel.for_training(RewardModelConfig(backbone_path=str(root / "policy"), lora_r=4,
                                                    lora_alpha=8), seed=0, device="cpu")
    PretrainedDirDataset(filepath=str(root / "reward_model")).save(rm)
    prompts = tokenize_prompts(format_prompts(groups), tok, 32)
    return root, prompts, groups


def test_one_online_round_raises_the_reward_model_score_of_the_policy_samples(tiny):
    from rpo_pipeline.pipelines.rpo_online.nodes import label_round, sample_round, train_round

    root, prompts, groups = tiny
    policy = PretrainedDirDataset(filepath=str(root / "policy")).load()
    tok = PretrainedDirDataset(filepath=str(root / "tokenizer"), load_class="transformers.AutoTokenizer").load()
    rm = PretrainedDirDataset(filepath=str(root / "reward_model"),
                              load_class="rpo_pipeline.reward_model.RewardModel").load()
    params = base_params("rpo_online", {
        "prompts_per_round": 48, "reward_normalization": "per_prompt", "sft_weight": 0.0,
        "beta": 0.1, "device": "cpu", "sampling.max_new_tokens": 12,
        "train": {**base_params("rpo_online")["train"], "steps": 24, "lr": 3e-3, "progress": False,
                  "warmup_steps": 2}})

    def rm_score_of_samples(handle, round_index):
        s = sample_round(handle, tok, prompts, params, round_index=round_index)
        return label_round(s, rm, policy, tok, {"mean": 0.0, "std": 1.0}, groups, NO_MODEL, params,
                           base_params("evaluation"), base_params("reward_model"))

    labelled = rm_score_of_samples(policy, 1)
    assert labelled["ref_logp"].lt(0).all() and labelled["target"].notna().all()
    assert labelled["gold"].between(0, 1).all()  # VADER on the decoded completions, to monitor
    np.testing.assert_allclose(labelled["ref_logp"], labelled["logp"], atol=1e-3)  # π = π_ref
    model, history, metrics = train_round(policy, tok, labelled, NO_CHECKPOINTS, params, round_index=1)
    assert history["loss"] and set(history) < set(metrics)  # the history is the curves only
    assert metrics["sample_reward_mean"][0]["value"] == pytest.approx(labelled["reward"].mean())
    assert metrics["sample_gold_mean"][0]["value"] == pytest.approx(labelled["gold"].mean())
    assert -1 <= metrics["rm_gold_spearman"][0]["value"] <= 1
    assert 0 <= metrics["rm_gold_pair_accuracy"][0]["value"] <= 1
    # gold never feeds training: the same round with other gold scores trains the same weights
    shuffled = labelled.assign(gold=labelled["gold"].sample(frac=1.0, random_state=0).to_numpy())
    other, _, _ = train_round(policy, tok, shuffled, NO_CHECKPOINTS, params, round_index=1)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values(),
                                                  strict=True))
    PretrainedDirDataset(filepath=str(root / "round_1")).save(model)
    trained = PretrainedDirDataset(filepath=str(root / "round_1")).load()
    # samples on the same prompts with the same seed: only the policy differs, so compare paired
    diff = rm_score_of_samples(trained, 1)["reward"].to_numpy() - labelled["reward"].to_numpy()
    se = diff.std(ddof=1) / np.sqrt(len(diff))
    assert diff.mean() > 3 * se, (diff.mean(), se)


def test_generate_preferences_writes_the_canonical_schema(tiny):
    from rpo_pipeline.pipelines.generate_preferences.nodes import (
        judge_with_gold,
        judge_with_reward_model,
        sample_responses,
    )
    from rpo_pipeline.preference_groups import GROUP_COLUMNS, groups_to_pairs
    from rpo_pipeline.text_format import format_groups

    root, prompts, groups = tiny
    sft = PretrainedDirDataset(filepath=str(root / "policy")).load()
    tok = PretrainedDirDataset(filepath=str(root / "tokenizer"), load_class="transformers.AutoTokenizer").load()
    rm = PretrainedDirDataset(filepath=str(root / "reward_model"),
                              load_class="rpo_pipeline.reward_model.RewardModel").load()
    params = base_params("generate_preferences", {"max_prompts": 6, "device": "cpu",
                                                  "progress": False, "sampling.max_new_tokens": 8})
    samples = sample_responses(sft, tok, prompts, params)
    n_val = min(6, int((prompts["split"] == "val").sum()))
    assert len(samples) == 4 * (6 + n_val)
    for judge, (out, metrics) in {
            "gold": judge_with_gold(samples, groups, NO_MODEL, base_params("evaluation")),
            "reward_model": judge_with_reward_model(samples, groups, rm, tok, params)}.items():
        assert list(out.columns) == [*GROUP_COLUMNS, "split"], judge
        assert list(groups.columns) == [*GROUP_COLUMNS, "split"]  # what data_processing writes
        assert set(out["split"]) == {"train", "val"} and len(out) == 6 + n_val
        assert out["responses"].map(len).eq(4).all() and out["scores"].map(len).eq(4).all()
        assert not out["labeled_pair"].any() and out["sft_target"].isna().all()
        assert out["group_id"].is_unique and (out["source_file"] == "generated:sft_model").all()
        src = groups.set_index("prompt")
        assert (src.loc[out["prompt"], "split"].to_numpy() == out["split"].to_numpy()).all()
        assert metrics["responses"][0]["value"] == 4 * len(out)
        # data_processing's next steps take it as they take ingested groups
        pairs = groups_to_pairs(out)
        assert (pairs["score_chosen"] > pairs["score_rejected"]).all()
        assert len(format_groups(out)) == 4 * len(out)
    gold = judge_with_gold(samples, groups, NO_MODEL, base_params("evaluation"))[0]
    texts = [t for r in gold["responses"] for t in r]
    from rpo_pipeline.evaluation import vader_positivity
    np.testing.assert_allclose([s for r in gold["scores"] for s in r], vader_positivity(texts))


def _round_setup(tiny, overrides):
    from rpo_pipeline.pipelines.rpo_online.nodes import label_round, sample_round

    root, prompts, groups = tiny
    policy = PretrainedDirDataset(filepath=str(root / "policy")).load()
    tok = PretrainedDirDataset(filepath=str(root / "tokenizer"), load_class="transformers.AutoTokenizer").load()
    rm = PretrainedDirDataset(filepath=str(root / "reward_model"),
                              load_class="rpo_pipeline.reward_model.RewardModel").load()
    params = base_params("rpo_online", {"device": "cpu", "prompts_per_round": 48,
                                        "sampling.max_new_tokens": 12, **overrides})
    samples = sample_round(policy, tok, prompts, params, round_index=1)
    labelled = label_round(samples, rm, policy, tok, {"mean": 0.0, "std": 1.0}, groups, NO_MODEL, params,
                           base_params("evaluation"), base_params("reward_model"))
    return params, policy, tok, rm, labelled


def test_judge_gold_trains_on_gold_scores(tiny):
    from rpo_pipeline.evaluation import vader_positivity

    params, *_, labelled = _round_setup(tiny, {"judge": "gold"})
    _, _, groups = tiny
    train = groups[groups["split"] == "train"]
    g = vader_positivity([r for rs in train["responses"] for r in rs])
    np.testing.assert_allclose(labelled["target"], (labelled["gold"] - g.mean()) / g.std(), atol=1e-9)
    assert not np.allclose(labelled["target"], labelled["reward"])  # not the reward model's


def test_one_refresh_raises_the_reward_models_gold_agreement_on_the_rounds_samples(tiny):
    from rpo_pipeline.online import refresh_pairs
    from rpo_pipeline.pipelines.rpo_online.nodes import count_gold_labels, refresh_reward_model, rescore_round
    from rpo_pipeline.preference_groups import groups_to_pairs
    from rpo_pipeline.text_format import format_groups, tokenize_examples

    root, _, groups = tiny
    params, _, tok, rm_handle, labelled = _round_setup(
        tiny, {"refresh": {"labels_per_round": 48, "steps": 40}})
    pairs = refresh_pairs(labelled, 48, seed=0, round_index=1)
    assert 0 < len(pairs) <= 48 and (pairs["gold_chosen"] > pairs["gold_rejected"]).all()
    tokenized = tokenize_examples(format_groups(groups), tok.load(), 32, 64)
    rm_params = base_params("reward_model", {"device": "cpu", "train.lr": 1e-2, "train.progress": False,
                                             "train.batch_size": 8})
    model, stats, all_pairs, metrics = refresh_reward_model(
        labelled, rm_handle, PretrainedDirDataset(filepath=str(root / "tokenizer"),
                                                  load_class="transformers.AutoTokenizer").load(),
        tokenized, groups_to_pairs(groups), groups, params, rm_params, round_index=1)
    before = metrics["refresh_before_rm_gold_spearman"][0]["value"]
    after = metrics["refresh_after_rm_gold_spearman"][0]["value"]
    assert after > before + 0.1, (before, after)
    assert len(all_pairs) == len(pairs) and stats["std"] > 0
    PretrainedDirDataset(filepath=str(root / "refreshed")).save(model)
    refreshed = PretrainedDirDataset(filepath=str(root / "refreshed"),
                                     load_class="rpo_pipeline.reward_model.RewardModel").load()
    rescored = rescore_round(labelled, refreshed, stats, params, rm_params)
    assert not np.allclose(rescored["reward"], labelled["reward"])
    np.testing.assert_allclose(rescored["target"], (rescored["reward"] - stats["mean"]) / stats["std"])
    used = count_gold_labels({"train_pairs": [{"value": 100, "step": 0}]}, params, all_pairs)
    assert used["gold_labels_used"][0]["value"] == 100 + len(pairs)
