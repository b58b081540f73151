"""Local pretrained causal LMs of any architecture as ``base_model.name_or_path``: a GPT-2 and a
Llama-style checkpoint (tiny, built here with ``save_pretrained``) through every stage, with their
own tokenizer, no pad token, their chat template, LoRA targets per architecture, 4-bit reward model."""

from __future__ import annotations

from pathlib import Path

import bitsandbytes as bnb
import numpy as np
import pandas as pd
import pytest
import torch
from helpers import mlflow_runs, run_kedro
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from rpo_pipeline.base_model import (
    LORA_TARGETS,
    linear_layer_names,
    load_pretrained,
    lora_target_modules,
    train_bpe_tokenizer,
)
from rpo_pipeline.reward_model import RewardModel, RewardModelConfig, RewardPair, pair_collate, score
from rpo_pipeline.training import train

TEXTS = ["prompt : the film [SEP] response : was wonderful and moving", "a dull and tedious plot",
         "<|user|> <|assistant|> great acting, weak ending"] * 40
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def tiny_checkpoint(path: Path, arch: str, chat_template: str | None = None) -> Path:
    """A randomly initialised ``arch`` (gpt2 | llama) LM + a BPE tokenizer without a pad token."""
    tok = train_bpe_tokenizer(TEXTS, vocab_size=400, min_frequency=1)
    tok.pad_token = None  # as many pretrained tokenizers ship
    if chat_template:
        tok.chat_template = chat_template
    torch.manual_seed(0)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=32, n_layer=2,
                                           n_head=2, bos_token_id=tok.bos_token_id,
                                           eos_token_id=tok.eos_token_id))
    else:
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=None))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pretrained")
    return {"gpt2": tiny_checkpoint(root / "gpt2", "gpt2"),
            "llama": tiny_checkpoint(root / "llama", "llama", CHAT_TEMPLATE)}


def test_pretrained_without_pad_token_pads_with_eos(checkpoints, caplog):
    with caplog.at_level("INFO", logger="rpo_pipeline.base_model"):
        model, tok = load_pretrained(str(checkpoints["llama"]))
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"
    assert model.config.pad_token_id == tok.eos_token_id
    assert "the tokenizer has no pad token; padding with its EOS token '<|endoftext|>'" in caplog.text
    assert tok.chat_template == CHAT_TEMPLATE  # its own template travels with it


def test_lora_targets_per_architecture_and_a_clear_error(checkpoints):
    gpt2, _ = load_pretrained(str(checkpoints["gpt2"]))
    llama, _ = load_pretrained(str(checkpoints["llama"]))
    assert lora_target_modules(gpt2, "auto") == ["c_attn", "c_proj", "c_fc"] == LORA_TARGETS["gpt2"]
    assert lora_target_modules(llama, "auto") == LLAMA_PROJECTIONS
    # the input embeddings are targets (peft LoRA on an Embedding), lm_head is not
    assert linear_layer_names(llama) == {*LLAMA_PROJECTIONS, "embed_tokens"}
    assert "wte" in linear_layer_names(gpt2) and "lm_head" not in linear_layer_names(gpt2)
    assert lora_target_modules(llama, "all-linear") == "all-linear"
    assert lora_target_modules(llama, ["q_proj", "v_proj"]) == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match=r"dpo.lora.target_modules: \['c_attn'\] match no linear or "
                                         r"embedding layer of this llama model; it has \['down_proj', "):
        lora_target_modules(llama, ["q_proj", "c_attn"], "dpo.lora.target_modules")


def test_4bit_reward_model_on_llama_trains_only_lora_and_head(checkpoints, tmp_path):
    _, tok = load_pretrained(str(checkpoints["llama"]))
    config = RewardModelConfig(backbone_path=str(checkpoints["llama"]), target_modules="auto")
    model = RewardModel.for_training(config, seed=0)
    assert model.config.target_modules == LLAMA_PROJECTIONS  # resolved and saved as such
    four_bit = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert all(n.endswith(".base_layer") for n in four_bit)  # each wrapped by a LoRA layer
    assert {n.split(".")[-2] for n in four_bit} == set(LLAMA_PROJECTIONS)
    g = torch.Generator().manual_seed(0)
    items = [RewardPair(torch.randint(3, len(tok), (10,), generator=g).tolist(),
                        torch.randint(3, len(tok), (7,), generator=g).tolist()) for _ in range(16)]
    lora_b = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    from helpers import train_config

    from rpo_pipeline.losses import reward_pair_loss_fn

    train(model, items, [10] * 16, pair_collate(), reward_pair_loss_fn(),
          train_config(steps=3, batch_size=8, lr=1e-2, warmup_steps=0))
    assert any(not torch.equal(lora_b[n], p) for n, p in model.named_parameters() if "lora_B" in n)
    model.save_pretrained(str(tmp_path / "rm"))
    seqs = [i.chosen_input_ids for i in items[:4]]
    again = RewardModel.from_pretrained(str(tmp_path / "rm"))
    starts = [3] * len(seqs)
    np.testing.assert_allclose(score(again, seqs, starts),
                               score(model, seqs, starts), atol=1e-5)


TINY = {"reference.sft.steps": 3, "reference.sft.progress": False, "reference.device": "cpu",
        "reward_model.train.steps": 2, "reward_model.train.progress": False, "reward_model.device": "cpu",
        "dpo.train.steps": 2, "dpo.train.progress": False, "dpo.device": "cpu",
        "rpo.train.steps": 2, "rpo.train.progress": False, "rpo.device": "cpu",
        "dpo.lora.enabled": True, "rpo.lora.enabled": True,
        "rpo_online.rounds": 1, "rpo_online.prompts_per_round": 8, "rpo_online.sampling.n_samples": 2,
        "rpo_online.sampling.max_new_tokens": 5, "rpo_online.train.steps": 2,
        "rpo_online.train.progress": False, "rpo_online.device": "cpu", "rpo_online.lora.enabled": True,
        "evaluation.max_prompts": 4, "evaluation.sampling.n_samples": 2,
        "evaluation.sampling.max_new_tokens": 5, "evaluation.progress": False, "evaluation.device": "cpu"}


def test_llama_checkpoint_with_its_chat_template_through_every_stage(project_copy, checkpoints):
    """`kedro run --pipelines=evaluation --params base_model.name_or_path=<llama dir>,...`."""
    run_kedro(project_copy, ["evaluation"], runtime_params={
        **TINY, "base_model.name_or_path": str(checkpoints["llama"]), "data_processing.use_chat_template": True})
    run = mlflow_runs(project_copy)[0]
    assert run.info.status == "FINISHED"
    for policy in ("reference", "dpo", "rpo", "rpo_online"):
        assert f"evaluation.{policy}.gold_reward_mean" in run.data.metrics
    formatted = pd.read_parquet(project_copy / "data/04_feature/formatted_examples.parquet")
    assert formatted["prompt_text"].str.startswith("<|user|> ").all()
    assert formatted["prompt_text"].str.endswith("<|assistant|>").all()
    saved = LlamaForCausalLM.from_pretrained(project_copy / "data/06_models/dpo_policy")
    assert not hasattr(saved, "peft_config")  # LoRA on q..down_proj, merged into a plain Llama
    rm = RewardModelConfig(**__import__("json").loads(
        (project_copy / "data/06_models/reward_model/reward_model.json").read_text()))
    assert rm.load_in_4bit and rm.target_modules == LLAMA_PROJECTIONS


def test_gpt2_checkpoint_without_pad_token_trains_dpo(project_copy, checkpoints):
    run_kedro(project_copy, ["dpo"], runtime_params={**TINY, "base_model.name_or_path": str(checkpoints["gpt2"])})
    run = mlflow_runs(project_copy)[0]
    assert run.info.status == "FINISHED" and "dpo.rewards/accuracies" in run.data.metrics
    tok = __import__("transformers").AutoTokenizer.from_pretrained(project_copy / "data/06_models/tokenizer")
    assert tok.pad_token == tok.eos_token  # the pad token we set is saved with the tokenizer
    with pytest.raises(ValueError, match=r"data_processing.max_length = 300 exceeds the 256 positions"):
        run_kedro(project_copy, ["data_processing"], runtime_params={
            "base_model.name_or_path": str(checkpoints["gpt2"]), "data_processing.max_length": 300})
