"""Base model and tokenizer: the builtin tiny GPT-2 (trained BPE + random init) or a pretrained one.

Kedro-free.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from rpo_pipeline.params import BaseModelParams

BUILTIN_TINY_GPT2 = "builtin:tiny-gpt2"
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
    """Causal LM and tokenizer from a local directory or a Hub id; pad token defaults to EOS."""
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(name_or_path, **load_args)
    return model, tokenizer


def make_base_model(params: BaseModelParams, training_texts: Iterable[str]
                    ) -> tuple[PreTrainedModel, Any]:
    """Base model and tokenizer as configured by the ``base_model`` parameters.

    ``chat_template`` (when set) replaces the tokenizer's chat template, builtin or pretrained.
    """
    if params.builtin:
        tokenizer = train_bpe_tokenizer(
            training_texts, vocab_size=params.tokenizer.vocab_size,
            min_frequency=params.tokenizer.min_frequency,
            model_max_length=params.model.n_positions)
        model = build_tiny_gpt2(tokenizer, seed=params.seed, **params.model.model_dump())
    else:
        model, tokenizer = load_pretrained(params.name_or_path, **params.load_args)
    if params.chat_template is not None:
        tokenizer.chat_template = params.chat_template
    return model, tokenizer
