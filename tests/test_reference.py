"""SFT learns; reference log-probs are exact under any padding; the stages hit their caches."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import DEFAULT_DATA, base_params, train_config

from rpo_pipeline.base_model import make_base_model
from rpo_pipeline.datasets import (
    CheckpointDir,
    FingerprintedParquetDataset,
    PretrainedDirDataset,
    read_preference_files,
    read_stored_fingerprint,
)
from rpo_pipeline.fingerprint import CacheHit, Fingerprinted
from rpo_pipeline.losses import sft_nll
from rpo_pipeline.params import BaseModelParams, ReferenceParams
from rpo_pipeline.pipelines.reference.nodes import build_reference_cache, train_sft
from rpo_pipeline.preference_groups import assign_splits, groups_to_pairs, ingest
from rpo_pipeline.reference import response_logps, select_examples, sft_collate, sft_items
from rpo_pipeline.scoring import ResponseLogps, packed_collate
from rpo_pipeline.text_format import format_groups, tokenize_examples
from rpo_pipeline.training import evaluate, train

TINY = BaseModelParams.parse(base_params("base_model", {
    "tokenizer.vocab_size": 1024, "model": {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 128,
              "activation_function": "gelu_pytorch_tanh"}}))
DATA_PARAMS = base_params("data_processing", {"max_prompt_length": 48, "max_length": 96})
REF_PARAMS = base_params("reference", {"device": "cpu", "sft.progress": False})

# no ``text`` groups: no SFT targets beyond the responses
NO_TEXT = pd.DataFrame({"group_id": [], "response_index": [], "split": [], "input_ids": [],
                        "response_start": [], "length": []})


@pytest.fixture(scope="module")
def data():
    """A 300-prompt slice of the default data, tokenized, with a tiny model saved to disk."""
    groups = ingest(read_preference_files(str(DEFAULT_DATA))).groups.head(300)
    groups = assign_splits(groups, {"train": 0.8, "val": 0.2}, 0)
    pairs = groups_to_pairs(groups)
    texts = [t for r in groups.itertuples() for t in [r.prompt, *r.responses]]
    model, tok = make_base_model(TINY, ["prompt : [SEP] response :"] * 20 + texts)
    tokenized = tokenize_examples(format_groups(groups), tok, 48, 96)
    return {"groups": groups, "pairs": pairs, "model": model, "tok": tok, "tokenized": tokenized}


@pytest.fixture
def saved(tmp_path, data):
    base = PretrainedDirDataset(filepath=str(tmp_path / "base_model"))
    tok = PretrainedDirDataset(filepath=str(tmp_path / "tokenizer"), load_class="transformers.AutoTokenizer")
    base.save(data["model"])
    tok.save(data["tok"])
    return base.load(), tok.load(), tmp_path


def test_sft_learns_on_held_out_data(data):
    import copy

    model = ResponseLogps(copy.deepcopy(data["model"]))
    tr = select_examples(data["tokenized"], data["pairs"], ["train"])
    va = select_examples(data["tokenized"], data["pairs"], ["val"])
    col = sft_collate()
    before = evaluate(model, *sft_items(va), col, sft_nll, 64)["loss"]
    res = train(model, *sft_items(tr), col, sft_nll,
                train_config(steps=40, lr=3e-3, batch_size=16, warmup_steps=5, log_every=10))
    after = evaluate(model, *sft_items(va), col, sft_nll, 64)["loss"]
    assert res.history["loss"][-1] < res.history["loss"][0]
    assert after < before - 1.0, (before, after)


def test_select_chosen_only(data):
    chosen = select_examples(data["tokenized"], data["pairs"], ["train"], "chosen")
    assert len(chosen) == (data["pairs"]["split"] == "train").sum()
    merged = chosen.merge(data["pairs"], on="group_id")
    assert (merged["response_index"] == merged["chosen_index"]).all()
    with pytest.raises(ValueError, match="'all' or 'chosen'"):
        select_examples(data["tokenized"], data["pairs"], ["train"], "best")


def _manual_logp(model, ids, start):
    """Unpadded single forward, full log-softmax, explicit sum over response tokens."""
    with torch.no_grad():
        logits = model(torch.tensor([list(ids)])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return sum(logp[t - 1, ids[t]].item() for t in range(start, len(ids))), len(ids) - start


def test_cached_logps_equal_fresh_with_any_batching(data):
    model = data["model"].eval()
    rows = data["tokenized"].head(40)
    ids, starts = rows["input_ids"].tolist(), rows["response_start"].tolist()
    cached, n_cached = response_logps(model, ids, starts, batch_size=16, progress=False)
    single, _ = response_logps(model, ids, starts, batch_size=1, progress=False)
    # float32 per token: batch shapes change the kernels' rounding (~1e-7 of a ~150-nat sum)
    np.testing.assert_allclose(cached, single, rtol=1e-6, atol=1e-5)
    for i in range(40):
        manual, n = _manual_logp(model, list(ids[i]), starts[i])
        assert abs(cached[i] - manual) < 1e-4 and n_cached[i] == n


def test_prompt_response_boundary_token_is_scored(data):
    """The first response token (predicted from the last prompt token) counts; the prompt does not."""
    model = data["model"].eval()
    ids, start = list(data["tokenized"].iloc[0]["input_ids"]), int(data["tokenized"].iloc[0]["response_start"])
    with torch.no_grad():
        total, n = ResponseLogps(model)(packed_collate([ids], [start]))
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    expected = sum(lp[t - 1, ids[t]].item() for t in range(start, len(ids)))
    without_first = expected - lp[start - 1, ids[start]].item()
    assert total.item() == pytest.approx(expected, abs=1e-4)
    assert abs(total.item() - without_first) > 1e-2 and int(n) == len(ids) - start


def test_sft_and_cache_nodes_hit_when_inputs_are_unchanged(data, saved):
    base, tok, root = saved
    params = base_params("reference", {"device": "cpu", "logprobs.batch_size": 32, "sft.steps": 3,
                                       "sft.batch_size": 8, "sft.lr": 1e-3, "sft.progress": False})
    sft_ds = PretrainedDirDataset(filepath=str(root / "sft_model"))
    cache_ds = FingerprintedParquetDataset(filepath=str(root / "ref.parquet"))
    tokenized, pairs = data["tokenized"], data["pairs"]

    def run(p, dp=DATA_PARAMS):
        out, m1 = train_sft(base, tok, tokenized, NO_TEXT, pairs,
                            read_stored_fingerprint(root / "sft_model"), p)
        sft_ds.save(out)
        stored = None
        if cache_ds.exists():
            stored = read_stored_fingerprint(root / "ref.parquet")
        out2, m2 = build_reference_cache(sft_ds.load(), tok, tokenized, stored, dp, p)
        cache_ds.save(out2)
        return out, out2, {**m1, **m2}

    a, b, m = run(params)
    assert isinstance(a, Fingerprinted) and isinstance(b, Fingerprinted)
    assert m["sft_cache_hit"][0]["value"] == 0 and m["cache_hit"][0]["value"] == 0
    table = cache_ds.load()
    assert len(table) == tokenized["split"].isin(["train", "val"]).sum()
    assert table[["group_id", "response_index"]].duplicated().sum() == 0
    assert (table["ref_logp"] < 0).all() and (table["ref_tokens"] > 0).all()

    a, b, m = run(params)  # nothing changed
    assert isinstance(a, CacheHit) and isinstance(b, CacheHit)
    assert m["sft_cache_hit"][0]["value"] == 1 and m["cache_hit"][0]["value"] == 1

    a, b, m = run(params, {**DATA_PARAMS, "max_length": 97})  # formatting changed: cache only
    assert isinstance(a, CacheHit) and isinstance(b, Fingerprinted)

    changed = {**params, "sft": {**params["sft"], "lr": 2e-3}}  # SFT changed: both
    a, b, m = run(changed, {**DATA_PARAMS, "max_length": 97})
    assert isinstance(a, Fingerprinted) and isinstance(b, Fingerprinted)


def test_sft_steps_zero_keeps_the_base_model(data, saved):
    base, tok, _ = saved
    params = base_params("reference", {"device": "cpu", "sft.steps": 0})
    out, m = train_sft(base, tok, data["tokenized"], NO_TEXT, data["pairs"], None, params)
    ref = out.value
    for (n1, p1), (_, p2) in zip(ref.named_parameters(), data["model"].named_parameters(), strict=True):
        assert torch.equal(p1, p2), n1
    assert "sft_loss" not in m


def test_unknown_training_parameter_fails_with_the_nearest_valid_name():
    with pytest.raises(ValueError, match=r"reference.sft.learning_rate: unknown key; did you mean lr\?"):
        ReferenceParams.parse(base_params("reference", {"sft.learning_rate": 2}))


def test_cache_table_has_no_test_split(data, saved):
    base, tok, _ = saved
    out, _ = build_reference_cache(base, tok, data["tokenized"], None, DATA_PARAMS, REF_PARAMS)
    assert set(out.value["split"]) == {"train", "val"}
    assert isinstance(out.value, pd.DataFrame)


def test_policy_training_with_lora_reads_only_the_cache_and_merges(data, saved, tmp_path):
    """DPO node: LoRA adapters train and are merged; π_ref's log-probs come from the cache table."""
    from rpo_pipeline.pipelines.policy_training.nodes import train_dpo_policy

    base, tok, _ = saved
    ref, _ = build_reference_cache(base, tok, data["tokenized"], None, DATA_PARAMS, REF_PARAMS)
    params = base_params("dpo", {
        "beta": 0.1, "sft_weight": 0.0, "device": "cpu",
        "lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["c_attn"]},
        "train.steps": 6, "train.batch_size": 8, "train.lr": 1e-2, "train.warmup_steps": 0,
        "train.progress": False, "train.log_every": 2, "train.eval_every": 3,
        "train.checkpoint_every": 0})
    policy, curve, history, metrics = train_dpo_policy(base, tok, data["tokenized"], data["pairs"],
                                                       ref.value, CheckpointDir(tmp_path / "ckpt"), params,
                                                       base_params("evaluation", {"curve.points": 3}))
    assert history["eval_rewards/accuracies"] == metrics["eval_rewards/accuracies"]
    assert not hasattr(policy, "peft_config")  # merged back into a plain causal LM
    assert list(curve) == ["2", "4"] and not any(hasattr(m, "peft_config") for m in curve.values())
    first, second = (dict(m.named_parameters()) for m in curve.values())
    assert any(not torch.equal(first[n], second[n]) for n in first)  # the weights of two steps
    moved = [n for (n, p), (_, q) in zip(policy.named_parameters(), data["model"].named_parameters(),
                                         strict=True) if not torch.equal(p, q)]
    assert moved and all("c_attn" in n for n in moved)  # only the adapted layers changed
    assert [s["step"] for s in metrics["eval_rewards/accuracies"]] == [3, 6]
    assert len(metrics["loss"]) == 3 and "pairs_per_second" in metrics
