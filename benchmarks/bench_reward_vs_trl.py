"""Reward model vs TRL RewardTrainer on HH-RLHF helpful-base (test split cut 90/10 by prompt).

    .venv/bin/python benchmarks/bench_reward_vs_trl.py [--steps 150] [--lr 1e-3]

Both get the same tiny GPT-2 (builtin config, random init, tokenizer trained on the train text),
the same token ids, 4-bit NF4 + LoRA on the same modules, the same steps, batch, learning rate,
schedule and clipping; TRL uses its sequence-classification head. Reports held-out pair accuracy
and pairs/s of each.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from rpo_pipeline.base_model import make_base_model
from rpo_pipeline.constants import BUILTIN_TINY_GPT2
from rpo_pipeline.datasets import read_preference_files
from rpo_pipeline.losses import reward_pair_loss_fn
from rpo_pipeline.params import BaseModelParams, base_parameters
from rpo_pipeline.preference_groups import assign_splits, groups_to_pairs, ingest
from rpo_pipeline.reward_model import RewardModel, RewardModelConfig, pair_collate, reward_pair_items
from rpo_pipeline.text_format import format_groups, tokenize_examples
from rpo_pipeline.training import LOOP_FEATURES_OFF, TrainConfig, evaluate, train

CONF = Path(__file__).resolve().parents[1] / "conf"

HH = Path(__file__).resolve().parents[2] / "shared/data/hh_rlhf/helpful-base_test.jsonl.gz"
TARGETS = ["c_attn", "c_proj", "c_fc"]


def trl_accuracy(model, test_items, pad_id: int, batch: int = 32) -> float:
    from rpo_pipeline.batching import collate

    model.eval()
    right = 0
    with torch.inference_mode():
        for i in range(0, len(test_items), batch):
            part = test_items[i:i + batch]
            seqs = [i.chosen_input_ids for i in part] + [i.rejected_input_ids for i in part]
            b = collate(seqs, [0] * len(seqs), pad_id, padding_side="right")
            r = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, 0].float()
            right += int((r[:len(part)] > r[len(part):]).sum())
    return right / len(test_items)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--full-precision", action="store_true",
                    help="LoRA on a float32 backbone for both (no 4-bit): a like-for-like check")
    args = ap.parse_args()
    if not HH.exists():
        raise SystemExit(f"{HH} not found (../shared/data beside the repo)")
    groups = ingest(read_preference_files(str(HH)), fmt="hh", on_invalid="drop").groups
    groups = assign_splits(groups, {"train": 0.9, "test": 0.1}, 42)
    pairs = groups_to_pairs(groups)
    train_g = groups[groups["split"] == "train"]
    texts = [t for r in train_g.itertuples() for t in [r.prompt, *r.responses]]
    params = BaseModelParams(name_or_path=BUILTIN_TINY_GPT2, seed=0,
                             tokenizer={"vocab_size": 4096, "min_frequency": 2},
                             model={"n_layer": 4, "n_embd": 256, "n_head": 4, "n_positions": 256},
                             chat_template=None, load_args={})
    model, tok = make_base_model(params, ["prompt : [SEP] response :"] * 20 + texts)
    tokenized = tokenize_examples(format_groups(groups), tok, 96, 128)
    items, lengths = reward_pair_items(tokenized, pairs, "train")
    test_items, test_lengths = reward_pair_items(tokenized, pairs, "test")
    print(f"{'full-precision LoRA' if args.full_precision else '4-bit NF4 + LoRA'}; "
          f"HH helpful-base: {len(items)} train pairs, {len(test_items)} test pairs "
          f"(split by prompt), {args.steps} steps x {args.batch} pairs, lr {args.lr}")

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

        # ours
        four_bit = not args.full_precision
        cfg = RewardModelConfig(backbone_path=tmp, lora_r=16, lora_alpha=32, target_modules=TARGETS,
                                load_in_4bit=four_bit)
        ours = RewardModel.for_training(cfg, seed=0)
        col, loss_fn = pair_collate(), reward_pair_loss_fn()
        t0 = time.perf_counter()
        train(ours, items, lengths, col, loss_fn,
              TrainConfig(**{**base_parameters("reward_model", CONF)["train"], **LOOP_FEATURES_OFF,
                             "steps": args.steps, "lr": args.lr, "batch_size": args.batch, "grad_accum": 1,
                             "warmup_steps": 10, "schedule": "cosine", "weight_decay": 0.0,
                             "max_grad_norm": 1.0, "seed": 0, "log_every": 10, "progress": False,
                             "precision": "fp32", "num_processes": 1, "max_tokens_per_batch": None,
                             "device": "cpu"}))
        ours_s = time.perf_counter() - t0
        ours_acc = evaluate(ours, test_items, test_lengths, col, loss_fn, 32, "cpu")["accuracy"]
        print(f"ours done: accuracy {ours_acc:.4f} in {ours_s:.1f} s", flush=True)

        # TRL, with its sequence-classification head on the same backbone and the same LoRA
        from datasets import Dataset
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig
        from trl import RewardConfig, RewardTrainer

        ds = Dataset.from_dict({"chosen_ids": [list(map(int, i.chosen_input_ids)) for i in items],
                                "rejected_ids": [list(map(int, i.rejected_input_ids)) for i in items]})
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.float32) if four_bit else None
        torch.manual_seed(0)
        trl_model = AutoModelForSequenceClassification.from_pretrained(
            tmp, num_labels=1, quantization_config=quant, device_map="cpu", dtype=torch.float32)
        if four_bit:
            trl_model = prepare_model_for_kbit_training(trl_model, use_gradient_checkpointing=False)
        trl_model = get_peft_model(trl_model, LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="SEQ_CLS"))
        # TRL casts a 4-bit model's trainable weights to bfloat16 (its QLoRA recipe); bfloat16 on
        # this CPU runs > 10 s per step, so keep float32 like ours: mark the wrapper unquantized
        trl_model.is_loaded_in_4bit = False
        trl_args = RewardConfig(
            output_dir=str(Path(tmp) / "trl"), max_steps=args.steps,
            per_device_train_batch_size=args.batch, learning_rate=args.lr,
            lr_scheduler_type="cosine", warmup_steps=10, max_grad_norm=1.0, seed=0,
            logging_steps=50, report_to=[], save_strategy="no", use_cpu=True, bf16=False,
            max_length=None, disable_tqdm=True, dataloader_num_workers=0)
        trainer = RewardTrainer(model=trl_model, args=trl_args, train_dataset=ds,
                                processing_class=tok)
        t0 = time.perf_counter()
        trainer.train()
        trl_s = time.perf_counter() - t0
        trl_acc = trl_accuracy(trainer.model, test_items, tok.pad_token_id)

    n = args.steps * args.batch
    print(f"ours : held-out accuracy {ours_acc:.4f}, {ours_s:6.1f} s, {n / ours_s:6.1f} pairs/s")
    print(f"TRL  : held-out accuracy {trl_acc:.4f}, {trl_s:6.1f} s, {n / trl_s:6.1f} pairs/s")
    print(f"difference {100 * (ours_acc - trl_acc):+.1f} points (goal: within 2); "
          f"speed ratio ours/TRL {trl_s / ours_s:.2f}x")


if __name__ == "__main__":
    main()
