"""Reward-model weight bytes in 4-bit NF4 vs full precision, for the default and a gpt2-sized model.

    .venv/bin/python benchmarks/bench_reward_weight_bytes.py

The gpt2-sized backbone is GPT2Config() (124 M parameters), randomly initialised: no training or
download needed. ``reward_model.weight_bytes`` = loaded backbone footprint + head; the full-precision
figure loads the same directory unquantized. The weights left unquantized (embeddings, norms) are
stored in ``reward_model.compute_dtype`` (float32 on CPU, bfloat16 on a GPU).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from rpo_pipeline.reward_model import load_backbone


def footprints(path: str, compute_dtype: str = "float32") -> tuple[int, int]:
    """(4-bit, full precision) bytes of backbone + head, loaded as the reward_model stage does."""
    head = (GPT2Config.from_pretrained(path).n_embd + 1) * 4
    q = load_backbone(path, load_in_4bit=True, compute_dtype=compute_dtype).get_memory_footprint()
    full = load_backbone(path, load_in_4bit=False).get_memory_footprint()
    return q + head, full + head


def main() -> None:
    default = Path("data/06_models/sft_model")
    if default.exists():
        q, f = footprints(str(default))
        print(f"default tiny model: {q / 1e6:7.2f} MB vs {f / 1e6:7.2f} MB full -> ratio {q / f:.3f}")
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config()).save_pretrained(tmp)
        n = sum(p.numel() for p in GPT2LMHeadModel.from_pretrained(tmp).parameters())
        for dtype in ("float32", "bfloat16"):
            q, f = footprints(tmp, dtype)
            print(f"gpt2-sized ({n / 1e6:.0f} M), compute_dtype {dtype}: {q / 1e6:7.1f} MB vs "
                  f"{f / 1e6:7.1f} MB full -> ratio {q / f:.3f}")


if __name__ == "__main__":
    main()
