"""Subprocess used by test_training.py: train a tiny GPT-2 with checkpoints, then save final weights.

    python tests/train_worker.py OUT_DIR STEPS RESUME(0|1) [NAN_AT_CALL [loss|grad]]

NAN_AT_CALL makes that micro-batch's loss NaN (``loss``) or keeps the loss finite and makes its
gradient NaN (``grad``: 0 * sqrt(|w - w|) is 0, its derivative is 0 * inf).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from helpers import train_config
from transformers import GPT2Config, GPT2LMHeadModel

from rpo_pipeline.losses import sft_nll
from rpo_pipeline.reference import SftExample, sft_collate
from rpo_pipeline.scoring import ResponseLogps
from rpo_pipeline.training import train


def main(out: str, steps: int, resume: bool, nan_at: int = 0, what: str = "loss") -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=2,
                                       n_head=2))  # dropout on: the RNG state matters on resume
    g = torch.Generator().manual_seed(1)
    items = [SftExample(torch.randint(1, 64, (int(n),), generator=g).tolist(), 4)
             for n in torch.randint(8, 40, (96,), generator=g)]
    calls = {"n": 0}

    def loss_fn(m, batch):
        calls["n"] += 1
        loss, metrics = sft_nll(m, batch)
        if nan_at and calls["n"] == nan_at:
            if what == "grad":
                w = next(m.parameters())
                return loss + 0.0 * (w - w.detach()).abs().sqrt().sum(), metrics
            return loss * float("nan"), metrics
        return loss, metrics

    cfg = train_config(steps=steps, lr=3e-3, batch_size=8, grad_accum=2, warmup_steps=3,
                       log_every=5, checkpoint_every=2, checkpoint_dir=str(Path(out) / "ckpt"),
                       resume=resume)
    train(ResponseLogps(model), items, [len(i.input_ids) for i in items], sft_collate(), loss_fn, cfg)
    torch.save(model.state_dict(), Path(out) / "final.pt")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4]) if len(sys.argv) > 4 else 0,
         sys.argv[5] if len(sys.argv) > 5 else "loss")
