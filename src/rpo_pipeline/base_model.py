"""Base model and tokenizer: the builtin tiny GPT-2 (trained BPE + random init) or a pretrained one.

Kedro-free.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.pytorch_utils import Conv1D

from rpo_pipeline.params import BaseModelParams

log = logging.getLogger(__name__)
EOS, PAD = "<|endoftext|>", "<|pad|>"


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2,
                        model_max_length: int = 256) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style) trained with ``tokenizers`` on ``texts``."""
    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=min_frequency,
                            special_tokens=[EOS, PAD], show_progress=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS,
        pad_token=PAD, model_max_length=model_max_length, clean_up_tokenization_spaces=False)


def build_tiny_gpt2(tokenizer: PreTrainedTokenizerFast, n_layer: int = 4, n_embd: int = 256,
                    n_head: int = 4, n_positions: int = 256, seed: int = 0,
                    **config: Any) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 sized for the tokenizer (seeded, so reproducible)."""
    cfg = GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd,
                     n_layer=n_layer, n_head=n_head, bos_token_id=tokenizer.bos_token_id,
                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                     **config)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(cfg)


def load_pretrained(name_or_path: str, **load_args: Any) -> tuple[PreTrainedModel, Any]:
    """Causal LM and its own tokenizer from a local directory or a Hub id (a registered
    ``models:/`` URI reaches here as the local directory ``datasets.ModelSourceDataset`` made).

    A tokenizer without a pad token gets its EOS token as pad (logged): padding is always masked
    (attention and loss masks come from lengths, never from the pad id), so sharing the id is safe.
    """
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.eos_token is None:
        raise ValueError(f"{name_or_path}: the tokenizer has no EOS token; responses end with EOS, so "
                         "set one (tokenizer.eos_token) and save the tokenizer again")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        log.info("%s: the tokenizer has no pad token; padding with its EOS token %r (id %d)",
                 name_or_path, tokenizer.eos_token, tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, **load_args)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def max_positions(model: PreTrainedModel) -> int | None:
    """The longest sequence the model's position embeddings cover (None if unbounded/unknown)."""
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(model.config, key, None)
        if isinstance(value, int):
            return value
    return None


# LoRA targets per architecture (model_type): attention and MLP projections. Others: "all-linear"
# (peft: every Linear / Conv1D / Linear4bit layer except the output embedding).
LORA_TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    **{t: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
       for t in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2")},
}


def linear_layer_names(model: torch.nn.Module) -> set[str]:
    """Last name components of the model's linear layers (Linear, GPT-2 Conv1D, bnb Linear4bit)
    and input embeddings (peft's LoRA adapts those too: a low-rank per-token update), the output
    embedding excluded: what ``lora.target_modules`` can name."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear | Conv1D | torch.nn.Embedding) and m is not out_emb
            and name}


def lora_target_modules(model: torch.nn.Module, spec: str | list[str], key: str = "lora.target_modules"
                        ) -> str | list[str]:
    """Resolve ``lora.target_modules`` for ``model``.

    ``auto``: the architecture's projections (``LORA_TARGETS``), else ``all-linear``;
    ``all-linear``: peft's every-linear-layer shorthand; a list: every name must be one of the
    model's linear or input-embedding layers, else a ``ValueError`` lists them.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", "?")
    if spec == "auto":
        spec = LORA_TARGETS.get(model_type, "all-linear")
    if spec == "all-linear":
        return spec
    available = linear_layer_names(model)
    unknown = [m for m in spec if m not in available]
    if unknown:
        raise ValueError(f"{key}: {unknown} match no linear or embedding layer of this {model_type} "
                         f"model; it has {sorted(available)}. Use names from that list, 'auto' "
                         "(per architecture) or 'all-linear'")
    return list(spec)


def make_base_model(params: BaseModelParams, training_texts: Iterable[str], name_or_path: str | None = None
                    ) -> tuple[PreTrainedModel, Any]:
    """Base model and tokenizer as configured by the ``base_model`` parameters; a pretrained one
    is read from ``name_or_path`` (``params.name_or_path`` as the run resolved it: a registered
    model's local copy), by default ``params.name_or_path`` itself.

    ``chat_template`` (when set) replaces the tokenizer's chat template, builtin or pretrained.
    """
    if params.builtin:
        tokenizer = train_bpe_tokenizer(
            training_texts, vocab_size=params.tokenizer.vocab_size,
            min_frequency=params.tokenizer.min_frequency,
            model_max_length=params.model.n_positions)
        model = build_tiny_gpt2(tokenizer, seed=params.seed, **params.model.model_dump())
    else:
        model, tokenizer = load_pretrained(name_or_path or params.name_or_path, **params.load_args)
    if params.chat_template is not None:
        tokenizer.chat_template = params.chat_template
    return model, tokenizer
