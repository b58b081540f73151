"""Reward model: 4-bit NF4 backbone, LoRA and head train (4-bit weights frozen), BT loss, save/load."""

from __future__ import annotations

import math

import bitsandbytes as bnb
import numpy as np
import pytest
import torch
from helpers import DEFAULT_DATA, base_params, train_config

from rpo_pipeline import reward_model
from rpo_pipeline.base_model import make_base_model
from rpo_pipeline.datasets import PretrainedDirDataset, read_preference_files
from rpo_pipeline.losses import bradley_terry, reward_pair_loss_fn
from rpo_pipeline.params import BaseModelParams
from rpo_pipeline.preference_groups import assign_splits, groups_to_pairs, ingest
from rpo_pipeline.reward_model import RewardModel, RewardModelConfig, load_backbone, pair_collate, reward_pair_items
from rpo_pipeline.text_format import format_groups, tokenize_examples
from rpo_pipeline.training import evaluate, train

TINY = BaseModelParams.parse(base_params("base_model", {
    "tokenizer.vocab_size": 1024, "model": {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 128,
              "activation_function": "gelu_pytorch_tanh"}}))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm")
    groups = ingest(read_preference_files(str(DEFAULT_DATA))).groups.head(600)
    groups = assign_splits(groups, {"train": 0.8, "val": 0.2}, 0)
    texts = [t for r in groups.itertuples() for t in [r.prompt, *r.responses]]
    model, tok = make_base_model(TINY, ["prompt : [SEP] response :"] * 20 + texts)
    PretrainedDirDataset(filepath=str(root / "backbone")).save(model)
    return {"root": root, "backbone": str(root / "backbone"), "tok": tok,
            "tokenized": tokenize_examples(format_groups(groups), tok, 48, 96),
            "pairs": groups_to_pairs(groups)}


def _config(setup, **kw):
    return RewardModelConfig(backbone_path=setup["backbone"], lora_r=8, lora_alpha=16, **kw)


def test_bradley_terry_equals_hand_computed_values():
    r_c, r_r = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.5])
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    plain = (-math.log(sig(1.0)) - math.log(sig(-1.0))) / 2  # = 0.813262
    assert bradley_terry(r_c, r_r).item() == pytest.approx(plain, abs=1e-6)
    assert plain == pytest.approx(0.8132616875, abs=1e-9)
    with_margin = (-math.log(sig(2.0 - 1.0 - 0.5)) - math.log(sig(0.5 - 1.5 - 0.0))) / 2
    assert bradley_terry(r_c, r_r, torch.tensor([0.5, 0.0])).item() == pytest.approx(with_margin, abs=1e-6)
    centered = plain + 0.1 * ((2.0 + 1.0) ** 2 + (0.5 + 1.5) ** 2) / 2  # + 0.1 * 6.5
    assert bradley_terry(r_c, r_r, 0.0, 0.1).item() == pytest.approx(centered, abs=1e-6)


def test_backbone_is_4bit_and_only_lora_and_head_learn(setup):
    model = RewardModel.for_training(_config(setup))
    linear4 = [m for m in model.backbone.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linear4) == 2 * 4  # c_attn, attn c_proj, c_fc, mlp c_proj per block
    assert all(m.weight.quant_state.quant_type == "nf4" for m in linear4)
    frozen = {id(m): m.weight.data.clone() for m in linear4}
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    head = model.head.weight.detach().clone()
    assert lora and all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    assert not any(m.weight.requires_grad for m in linear4)

    items, lengths = reward_pair_items(setup["tokenized"], setup["pairs"], "train")
    train(model, items, lengths, pair_collate(), reward_pair_loss_fn(),
          train_config(steps=2, lr=1e-2, batch_size=8, warmup_steps=0))
    assert all(torch.equal(frozen[id(m)], m.weight.data) for m in linear4)
    changed = [n for n, p in model.named_parameters() if "lora_B" in n and not torch.equal(lora[n], p)]
    assert changed, "LoRA weights did not move"
    assert not torch.equal(head, model.head.weight)


def test_reward_model_learns_and_survives_save_load(setup, tmp_path):
    model = RewardModel.for_training(_config(setup), seed=1)
    col, loss_fn = pair_collate(), reward_pair_loss_fn()
    items, lengths = reward_pair_items(setup["tokenized"], setup["pairs"], "train")
    val, val_len = reward_pair_items(setup["tokenized"], setup["pairs"], "val")
    res = train(model, items, lengths, col, loss_fn,
                train_config(steps=200, lr=3e-3, batch_size=16, warmup_steps=10, log_every=10))
    assert res.history["loss"][-1] < res.history["loss"][0]
    acc = evaluate(model, val, val_len, col, loss_fn, 32, "cpu")["accuracy"]
    assert acc > 0.75, acc  # held-out pairs; chance is 0.5
    ds = PretrainedDirDataset(filepath=str(tmp_path / "rm"), load_class="rpo_pipeline.reward_model.RewardModel")
    ds.save(model)
    assert (tmp_path / "rm" / "adapter_model.safetensors").exists()
    assert (tmp_path / "rm" / "reward_head.safetensors").exists()
    fresh = ds.load().load()
    seqs = [i.chosen_input_ids for i in val[:8]] + [i.rejected_input_ids for i in val[:8]]
    starts = [2] * len(seqs)
    before = reward_model.score(model, seqs, starts)
    after = reward_model.score(fresh, seqs, starts)
    np.testing.assert_allclose(after, before, atol=1e-4)  # adapter and head both restored


def test_logits_head_and_full_precision_variant(setup):
    model = RewardModel.for_training(_config(setup, head_input="logits", load_in_4bit=False))
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert model.head.in_features == len(setup["tok"])
    from rpo_pipeline.reward_model import RewardPair

    batch = pair_collate()([RewardPair([5, 6, 7], [5, 6, 8, 9])])
    assert model(batch).shape == (2,)
    with pytest.raises(ValueError, match="head_input"):
        RewardModelConfig(backbone_path="x", head_input="pooled")


def test_full_finetune_trains_every_backbone_weight_and_survives_save_load(setup, tmp_path):
    """``finetune: full``: no LoRA, every backbone weight moves; the saved directory holds the
    fine-tuned backbone, so a fresh copy (and a continued one) scores as the trained model."""
    model = RewardModel.for_training(_config(setup, load_in_4bit=False, finetune="full"), seed=1)
    assert not any("lora_" in n for n, _ in model.named_parameters())
    before = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    assert all(p.requires_grad for p in model.parameters())
    items, lengths = reward_pair_items(setup["tokenized"], setup["pairs"], "train")
    train(model, items, lengths, pair_collate(), reward_pair_loss_fn(),
          train_config(steps=3, lr=1e-3, batch_size=8, warmup_steps=0))
    moved = [n for n, p in model.backbone.named_parameters() if not torch.equal(before[n], p)]
    assert any("h.0.attn.c_attn" in n for n in moved) and any("wte" in n for n in moved)
    ds = PretrainedDirDataset(filepath=str(tmp_path / "rm"), load_class="rpo_pipeline.reward_model.RewardModel")
    ds.save(model)
    assert (tmp_path / "rm" / "model.safetensors").exists()
    seqs = [i.chosen_input_ids for i in items[:6]]
    want = reward_model.score(model, seqs, [2] * 6)
    np.testing.assert_allclose(reward_model.score(ds.load().load(), seqs, [2] * 6), want, atol=1e-5)
    again = RewardModel.continue_training(str(tmp_path / "rm"))
    assert all(p.requires_grad for p in again.parameters())
    np.testing.assert_allclose(reward_model.score(again, seqs, [2] * 6),
                               want, atol=1e-5)
    with pytest.raises(ValueError, match="needs load_in_4bit false and members 1"):
        RewardModelConfig(backbone_path="x", finetune="full")


def test_4bit_footprint_is_a_fraction_of_full_precision(setup):
    q = load_backbone(setup["backbone"], load_in_4bit=True).get_memory_footprint()
    full = load_backbone(setup["backbone"], load_in_4bit=False).get_memory_footprint()
    assert q < 0.6 * full  # the tiny model is embedding-heavy; see the benchmark for gpt2 size


def test_margin_column_without_scores_fails_before_any_model_loads(setup):
    items, _ = reward_pair_items(setup["tokenized"], setup["pairs"], "train", "score_difference")
    scores = setup["pairs"]["score_chosen"] - setup["pairs"]["score_rejected"]
    train = setup["pairs"]["split"] == "train"
    assert [i.margin for i in items] == pytest.approx(scores[train].tolist())  # the default data has scores
    unscored = setup["pairs"].assign(score_chosen=float("nan"))
    with pytest.raises(ValueError, match=r"reward_model.margin_column 'score_difference': \d+ of \d+ train "
                                         r"pairs have no finite value .* set margin_column: null"):
        reward_pair_items(setup["tokenized"], unscored, "train", "score_difference")


def test_ensemble_bradley_terry_weights_each_member_by_its_bootstrap_counts():
    from rpo_pipeline.losses import ensemble_bradley_terry

    r_c, r_r = torch.tensor([[2.0, 0.0], [0.5, 1.0]]), torch.tensor([[1.0, 1.0], [1.5, 0.0]])
    w = torch.tensor([[2.0, 0.0], [1.0, 1.0]])  # member 1 did not draw pair 0
    nll = lambda x: -math.log(1 / (1 + math.exp(-x)))  # noqa: E731
    member0 = (2 * nll(1.0) + nll(-1.0)) / 3
    member1 = nll(1.0)
    assert ensemble_bradley_terry(r_c, r_r, w).item() == pytest.approx((member0 + member1) / 2, abs=1e-6)
    ones = torch.ones(2, 2)  # equal weights: the mean of the members' plain losses
    assert ensemble_bradley_terry(r_c, r_r, ones).item() == pytest.approx(
        (bradley_terry(r_c[:, 0], r_r[:, 0]) + bradley_terry(r_c[:, 1], r_r[:, 1])).item() / 2, abs=1e-6)


def test_ensemble_of_two_scores_with_a_spread_and_min_below_mean(setup, tmp_path):
    """Two members: two LoRA adapters on the one 4-bit backbone (peft multi-adapter), each with its
    seed, head row and bootstrap resample; both learn, and they survive save / load."""
    model = RewardModel.for_training(_config(setup, members=2), seed=0)
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    assert {n.split(".")[-2] for n in lora} == {"default", "member_1"}
    items, lengths = reward_pair_items(setup["tokenized"], setup["pairs"], "train")
    items = reward_model.with_bootstrap(items, 2, seed=0)
    counts = np.array([i.member_weights for i in items])
    assert counts.shape == (len(items), 2) and (counts.sum(0) == len(items)).all()
    assert (counts[:, 0] != counts[:, 1]).any()  # each member its own resample
    from rpo_pipeline.jobs import RewardModelJob, Split
    from rpo_pipeline.params import RewardModelParams

    params = base_params("reward_model", {"device": "cpu", "comparisons": "pairs", "ensemble.members": 2,
                                          "train.steps": 4, "train.lr": 1e-2, "train.warmup_steps": 0,
                                          "train.batch_size": 8, "train.progress": False})
    job = RewardModelJob(config=model.config, params=RewardModelParams.parse(params), train=Split(items, lengths))
    model, result, _ = job.run(model)  # one member after another, each its resample
    moved = {n.split(".")[-2] for n, p in model.named_parameters() if "lora_B" in n and not torch.equal(lora[n], p)}
    assert moved == {"default", "member_1"}, moved
    assert model.member is None and len(result.history["loss"]) == 1  # member 0's curve, 4 steps
    seqs = [i.chosen_input_ids for i in items[:16]]
    starts = [i.chosen_response_start for i in items[:16]]
    members = reward_model.score(model, seqs, starts)
    model.save_pretrained(str(tmp_path / "ens"))
    assert (tmp_path / "ens" / "member_1" / "adapter_model.safetensors").exists()
    again = RewardModel.from_pretrained(str(tmp_path / "ens"))
    np.testing.assert_allclose(reward_model.score(again, seqs, starts), members,
                               atol=1e-4)
    assert members.shape == (16, 2)
    mean, std = reward_model.ensemble_reward(members, "mean")
    low, _ = reward_model.ensemble_reward(members, "min")
    pessimistic, _ = reward_model.ensemble_reward(members, "mean_minus_std", penalty=2.0)
    assert (std > 0).all()
    assert (low <= mean).all() and (low < mean).any()
    np.testing.assert_allclose(pessimistic, mean - 2.0 * std)
    np.testing.assert_allclose(mean, members.mean(1))


def test_mean_pooling_averages_the_response_states_in_every_batch_layout(setup):
    from rpo_pipeline.reward_model import RewardPair

    model = RewardModel.for_training(_config(setup, pooling="mean", load_in_4bit=False), seed=0).eval()
    seqs = [[5, 6, 7, 8, 9], [5, 6, 7, 10], [11, 12, 13, 14, 15, 16]]
    starts = [3, 3, 2]
    decoder = model.backbone.get_decoder()
    with torch.no_grad():
        want = []
        for s, k in zip(seqs, starts, strict=True):
            h = decoder(input_ids=torch.tensor([s])).last_hidden_state[0]
            want.append(model.head(h[k:].mean(0)).item())
        shared = reward_model.score(model, seqs, starts)[:, 0]
        single = reward_model.score(model, seqs, starts, batch_size=1)[:, 0]
        pair = model(pair_collate()([RewardPair(seqs[0], seqs[1], 0.0, 3, 3)]))
    np.testing.assert_allclose(shared, want, atol=1e-5)
    np.testing.assert_allclose(single, want, atol=1e-5)
    np.testing.assert_allclose(pair.numpy(), want[:2], atol=1e-5)
    last = RewardModel(model.backbone, RewardModelConfig(backbone_path="x"), model.head).eval()
    with torch.no_grad():
        h = decoder(input_ids=torch.tensor([seqs[0]])).last_hidden_state[0]
        assert reward_model.score(last, seqs[:1], starts[:1])[0, 0] == pytest.approx(
            model.head(h[-1]).item(), abs=1e-5)


def test_all_comparisons_of_a_group_are_its_ordered_pairs():
    import pandas as pd

    groups = pd.DataFrame({"group_id": ["g", "t"], "prompt": ["p", "q"],
                           "responses": [["a", "b", "c"], ["x", "y"]],
                           "scores": [[0.1, 0.5, 0.3], [0.2, 0.2]], "labeled_pair": [False, False],
                           "split": ["train", "train"]})
    pairs = groups_to_pairs(groups, rejected="all")
    assert sorted(zip(pairs["chosen"], pairs["rejected"], strict=True)) == [("b", "a"), ("b", "c"), ("c", "a")]
    assert (pairs["score_chosen"] > pairs["score_rejected"]).all()  # the tied group gives none
