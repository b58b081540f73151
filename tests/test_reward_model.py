"""Reward model: 4-bit NF4 backbone, LoRA and head train (4-bit weights frozen), BT loss, save/load."""

from __future__ import annotations

import math

import bitsandbytes as bnb
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
    "tokenizer.vocab_size": 1024, "model": {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 128}}))


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
    train(model, items, lengths, pair_collate(setup["tok"].pad_token_id), reward_pair_loss_fn(),
          train_config(steps=2, lr=1e-2, batch_size=8, warmup_steps=0))
    assert all(torch.equal(frozen[id(m)], m.weight.data) for m in linear4)
    changed = [n for n, p in model.named_parameters() if "lora_B" in n and not torch.equal(lora[n], p)]
    assert changed, "LoRA weights did not move"
    assert not torch.equal(head, model.head.weight)


def test_reward_model_learns_and_survives_save_load(setup, tmp_path):
    model = RewardModel.for_training(_config(setup), seed=1)
    col, loss_fn = pair_collate(setup["tok"].pad_token_id), reward_pair_loss_fn()
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
    seqs = [c for c, _, _ in val[:8]] + [r for _, r, _ in val[:8]]
    starts = [2] * len(seqs)
    before = reward_model.score(model, seqs, starts, setup["tok"].pad_token_id)
    after = reward_model.score(fresh, seqs, starts, setup["tok"].pad_token_id)
    assert after == pytest.approx(before, abs=1e-4)  # adapter and head both restored


def test_logits_head_and_full_precision_variant(setup):
    model = RewardModel.for_training(_config(setup, head_input="logits", load_in_4bit=False))
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert model.head.in_features == len(setup["tok"])
    from rpo_pipeline.reward_model import RewardPair

    batch = pair_collate(setup["tok"].pad_token_id)([RewardPair([5, 6, 7], [5, 6, 8, 9])])
    assert model(batch).shape == (2,)
    with pytest.raises(ValueError, match="head_input"):
        RewardModelConfig(backbone_path="x", head_input="pooled")


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
