"""Subprocess used by test_jobs.py: DPO on 2 worker processes with checkpoints, then save the
final weights.

    python tests/scale_worker.py OUT_DIR STEPS RESUME(0|1)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from helpers import base_params
from transformers import GPT2Config, GPT2LMHeadModel

from rpo_pipeline.jobs import DpoJob, Split, fit
from rpo_pipeline.params import DpoParams
from rpo_pipeline.policy import PreferencePair


def main(out: str, steps: int, resume: bool) -> None:
    lm = Path(out) / "lm"
    if not lm.exists():
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                   eos_token_id=1, bos_token_id=1)).save_pretrained(lm)
    g = torch.Generator().manual_seed(1)
    items = []
    for _ in range(64):
        w, lo = (torch.randint(2, 64, (int(n),), generator=g).tolist()
                 for n in torch.randint(6, 30, (2,), generator=g))
        items.append(PreferencePair(w, 3, lo, 3, -3.5 * len(w), -3.6 * len(lo)))
    data = Split(items, [max(len(i.chosen_input_ids), len(i.rejected_input_ids)) for i in items])
    params = base_params("dpo", {"train.steps": steps, "train.batch_size": 4, "train.grad_accum": 2,
                                 "train.warmup_steps": 2, "train.log_every": 5, "train.eval_every": 0,
                                 "train.progress": False, "train.checkpoint_every": 2,
                                 "train.resume": resume, "train.num_processes": 2,
                                 "disable_dropout": False,  # dropout on: each rank's RNG matters
                                 "device": "cpu"})
    job = DpoJob(model_path=str(lm), params=DpoParams.parse(params), train=data, val=Split([], []),
                 checkpoint_dir=str(Path(out) / "ckpt"))
    model, _, _ = fit(job, 2, "gloo", "cpu", None, GPT2LMHeadModel.from_pretrained)
    torch.save(model.state_dict(), Path(out) / "final.pt")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1")
