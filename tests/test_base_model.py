"""Builtin tiny GPT-2 + BPE tokenizer and the save_pretrained directory dataset."""

from __future__ import annotations

import pytest
import torch
from helpers import base_params

from rpo_pipeline.base_model import make_base_model
from rpo_pipeline.datasets import PretrainedDirDataset
from rpo_pipeline.params import BaseModelParams

TEXTS = ["the film was wonderful and the acting superb", "a dull and tedious plot",
         "prompt : [SEP] response :"] * 50
PARAMS = BaseModelParams.parse(base_params("base_model", {
    "seed": 3, "tokenizer.vocab_size": 400,
    "model": {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 128,
              "activation_function": "gelu_pytorch_tanh"}}))


def test_builtin_model_matches_config_and_is_seeded():
    model, tok = make_base_model(PARAMS, TEXTS)
    assert model.config.n_layer == 2 and model.config.n_embd == 64
    assert model.config.vocab_size == len(tok) <= 400
    assert tok.eos_token_id != tok.pad_token_id and model.config.eos_token_id == tok.eos_token_id
    ids = tok("the film was wonderful")["input_ids"]
    assert tok.decode(ids) == "the film was wonderful" and len(ids) < 10  # merges were learned
    model2, _ = make_base_model(PARAMS, TEXTS)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters(), strict=True))


def test_pretrained_dir_roundtrip_safetensors(tmp_path):
    model, tok = make_base_model(PARAMS, TEXTS)
    mds = PretrainedDirDataset(filepath=str(tmp_path / "m"))
    tds = PretrainedDirDataset(filepath=str(tmp_path / "t"), load_class="transformers.AutoTokenizer")
    assert not mds.exists()
    mds.save(model)
    tds.save(tok)
    assert (tmp_path / "m" / "model.safetensors").exists() and mds.exists()
    loaded, ltok = mds.load().load(), tds.load().load()  # handles load on demand
    x = torch.tensor([tok("a dull plot")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(model.eval()(x).logits, loaded.eval()(x).logits)
    assert ltok("a dull plot")["input_ids"] == tok("a dull plot")["input_ids"]
    assert ltok.pad_token == tok.pad_token


def test_interrupted_save_keeps_the_previous_directory(tmp_path):
    model, _ = make_base_model(PARAMS, TEXTS)
    ds = PretrainedDirDataset(filepath=str(tmp_path / "m"))
    ds.save(model)
    before = sorted(p.name for p in (tmp_path / "m").iterdir())

    class Crashing:
        def save_pretrained(self, path, **kw):
            model.save_pretrained(path)
            raise KeyboardInterrupt("killed mid-save")

    with pytest.raises(KeyboardInterrupt):
        ds.save(Crashing())
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp directory left behind
    ds.load()
