"""DPO training speed: our loop vs TRL DPOTrainer, same tiny model, batch and data, alternated.

    .venv/bin/kedro run --pipelines=reference      # once: SFT model, tokenized data, ref cache
    .venv/bin/python benchmarks/bench_dpo_vs_trl.py [--steps 40] [--rounds 2]

Both start from the SFT model with the same token ids (prompt + response), batch of pairs,
β = 0.1 sigmoid loss, AdamW lr 5e-4, cosine schedule, clipping 1.0, dropout on. Ours reads π_ref's
log-probs from the cache; TRL runs its reference model (its default) — that difference is the
point of the cache. Pairs/s counts training steps only (TRL's ``train_runtime``).
"""

from __future__ import annotations

import argparse
import tempfile

import pandas as pd
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rpo_pipeline.losses import preference_loss
from rpo_pipeline.policy import policy_collate, preference_items
from rpo_pipeline.scoring import ResponseLogprobs
from rpo_pipeline.training import TrainConfig, train

SFT, TOK = "data/06_models/sft_model", "data/06_models/tokenizer"


def ours(items, lengths, pad_id, steps, batch) -> float:
    model = AutoModelForCausalLM.from_pretrained(SFT)
    cfg = TrainConfig(steps=steps, lr=5e-4, batch_size=batch, grad_accum=1, warmup_steps=4,
                      schedule="cosine", weight_decay=0.0, max_grad_norm=1.0, seed=0,
                      log_every=steps, progress=False, device="cpu")
    res = train(ResponseLogprobs(model), items, lengths, policy_collate(pad_id),
                preference_loss("sigmoid", 0.1), cfg)
    return steps * batch / res.seconds


def trl_dataset(pairs: pd.DataFrame):
    """TRL prepares datasets from text: the same formatted prompt and response strings we tokenize
    (prompt and completion tokenized separately + EOS, as ours, so the token ids match)."""
    from datasets import Dataset

    fx = pd.read_parquet("data/04_feature/formatted_examples.parquet").set_index(
        ["group_id", "response_index"])
    p = pairs[pairs["split"] == "train"]
    chosen = fx.loc[list(zip(p["group_id"], p["chosen_index"], strict=True))]
    rejected = fx.loc[list(zip(p["group_id"], p["rejected_index"], strict=True))]
    return Dataset.from_dict({"prompt": chosen["prompt_text"].tolist(),
                              "chosen": chosen["response_text"].tolist(),
                              "rejected": rejected["response_text"].tolist()})


def trl(ds, tok, steps, batch) -> float:
    from trl import DPOConfig, DPOTrainer

    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(output_dir=tmp, max_steps=steps, per_device_train_batch_size=batch,
                         learning_rate=5e-4, lr_scheduler_type="cosine", warmup_steps=4,
                         max_grad_norm=1.0, beta=0.1, loss_type=["sigmoid"], seed=0,
                         report_to=[], save_strategy="no", use_cpu=True, bf16=False,
                         logging_steps=steps, disable_tqdm=True, disable_dropout=False,
                         max_length=None, dataloader_num_workers=0,
                         model_init_kwargs={"dtype": torch.float32})
        trainer = DPOTrainer(model=SFT, args=args, train_dataset=ds, processing_class=tok)
        out = trainer.train()
    return steps * batch / out.metrics["train_runtime"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(TOK)
    tokenized = pd.read_parquet("data/05_model_input/tokenized_examples.parquet")
    pairs = pd.read_parquet("data/03_primary/preference_pairs.parquet")
    ref = pd.read_parquet("data/07_model_output/reference_logprobs.parquet")
    items, lengths = preference_items(tokenized, pairs, ref, "train")
    ds = trl_dataset(pairs)
    print(f"{len(items)} train pairs, {args.steps} steps x {args.batch} pairs per run")
    rates: dict[str, list[float]] = {"ours": [], "trl": []}
    for r in range(args.rounds):
        rates["ours"].append(ours(items, lengths, tok.pad_token_id, args.steps, args.batch))
        rates["trl"].append(trl(ds, tok, args.steps, args.batch))
        print(f"round {r + 1}: ours {rates['ours'][-1]:.1f} pairs/s, TRL {rates['trl'][-1]:.1f} pairs/s",
              flush=True)
    o, t = (sum(v) / len(v) for v in (rates["ours"], rates["trl"]))
    print(f"mean: ours {o:.1f} pairs/s, TRL DPOTrainer {t:.1f} pairs/s, ratio {o / t:.2f}x")


if __name__ == "__main__":
    main()
