"""DPO training speed, ours vs TRL ``DPOTrainer`` at its best, plus RPO K = 4, the reference cache
and evaluation sampling: one command, results committed.

    .venv/bin/kedro run --pipelines=reference       # once: tokenizer, tokenized data, SFT model
    .venv/bin/python benchmarks/bench_dpo_vs_trl.py [--reps 3] [--steps 12] [--batch 16]

Writes ``benchmarks/results/dpo_vs_trl.json`` and ``.md``.

How it measures (issue 13):

- Two models: ``tiny``, the default SFT model, and ``gpt2-8x512`` (8 layers x 512 wide, GPT-2
  built from config with the same tokenizer; random weights: speed does not depend on them).
- The same token ids for both sides: TRL gets the formatted prompt and response strings, which it
  tokenizes as we do (prompt and response separately, EOS after the response). Both train on the
  same ``steps x batch`` train pairs (one pass), β 0.1 sigmoid, AdamW lr 5e-4, cosine, clipping
  1.0, dropout off (TRL's default, ours too). We length-bucket the batches; TRL shuffles.
- Ours reads π_ref from the cache (its build is timed separately, as TRL's precompute is not part
  of its ``train_runtime``). Pairs/s = pairs trained / training time.
- TRL in eight settings: its defaults (on CPU ``bf16=True`` and gradient checkpointing on), fp32,
  fp32 without gradient checkpointing, that + ``precompute_ref_log_probs``, that +
  ``padding_free``, and the same three in bf16 (only where bf16 runs natively: a GPU, or a CPU
  with AVX-512-BF16 / AMX; elsewhere recorded as skipped, with the CPU capability). "TRL best" is
  the fastest that ran. A setting that fails is recorded with its error. TRL's defaults run bf16,
  which on a CPU without native bf16 takes minutes per step, so they get ``--defaults-steps``
  steps (a rate needs no more).
- Ours runs in the precision it would pick (``--precision``) and in the other one (bf16 without
  native support: ``--defaults-steps`` steps, as TRL's defaults).
- Alternating: each repetition runs every contender once, in turn; the median of ``--reps``.
- ``mfu``: our training FLOPs per pair (counted with ``FlopCounterMode`` over the first batches,
  forward + backward as executed, the shared prompt once) x pairs/s, over the matmul peak of the
  dtype that ran, measured in the same run (best of a few 1024^3 matmuls).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, TrainerCallback

from rpo_pipeline.evaluation import generate
from rpo_pipeline.jobs import disable_dropout
from rpo_pipeline.losses import preference_loss_fn, reward_aware_loss_fn
from rpo_pipeline.params import SamplingConfig, base_parameters
from rpo_pipeline.policy import group_collate, group_items, policy_collate, preference_items
from rpo_pipeline.precision import cpu_bf16_flags, resolve_precision
from rpo_pipeline.reference import reference_table, response_logps
from rpo_pipeline.scoring import ResponseLogps
from rpo_pipeline.training import LOOP_FEATURES_OFF, TrainConfig, iterate_batches, train

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# a project's data folder (after `kedro run --pipelines=reference`) and the device: set by --data and
# --device (scripts/gpu_check.py runs this on a fresh project copy on a GPU)
DATA = ROOT / "data"
SFT, TOK = DATA / "06_models/sft_model", DATA / "06_models/tokenizer"
DEVICE = "cpu"
OUT = ROOT / "benchmarks/results/dpo_vs_trl"
BETA, LR = 0.1, 5e-4
TRL_SETTINGS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "fp32": {"bf16": False},
    "fp32_no_checkpointing": {"bf16": False, "gradient_checkpointing": False},
    "fp32_no_checkpointing_precomputed_ref": {"bf16": False, "gradient_checkpointing": False,
                                              "precompute_ref_log_probs": True},
    "padding_free": {"bf16": False, "gradient_checkpointing": False,
                     "precompute_ref_log_probs": True, "padding_free": True},
    # bf16 settings: only on a CPU that runs bf16 natively (AVX-512-BF16 / AMX) or a GPU
    "bf16": {"bf16": True},
    "bf16_no_checkpointing": {"bf16": True, "gradient_checkpointing": False},
    "bf16_no_checkpointing_precomputed_ref": {"bf16": True, "gradient_checkpointing": False,
                                              "precompute_ref_log_probs": True},
}
BF16_SETTINGS = {"bf16", "bf16_no_checkpointing", "bf16_no_checkpointing_precomputed_ref"}


# ---- the machine -----------------------------------------------------------------------------
def matmul_peak(dtype: torch.dtype, size: int = 1024, repeats: int = 3) -> float:
    """Best GFLOP/s of a size^3 matmul in ``dtype`` (the denominator of the MFU)."""
    a = torch.randn(size, size).to(dtype)
    a @ a
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e9


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_bf16_flags": list(cpu_bf16_flags()),
            "fp32_gflops": matmul_peak(torch.float32), "bf16_gflops": matmul_peak(torch.bfloat16),
            "fp32_gflops_256": matmul_peak(torch.float32, 256),
            "bf16_gflops_256": matmul_peak(torch.bfloat16, 256)}


# ---- data --------------------------------------------------------------------------------------
def trl_dataset(pairs: pd.DataFrame, chosen_ids: list, rejected_ids: list):
    """TRL prepares datasets from text: the same formatted prompt and response strings we tokenize
    (prompt and response tokenized separately + EOS, as ours, so the token ids match)."""
    from datasets import Dataset

    fx = pd.read_parquet(DATA / "04_feature/formatted_examples.parquet").set_index(
        ["group_id", "response_index"])
    chosen = fx.loc[chosen_ids]
    rejected = fx.loc[rejected_ids]
    return Dataset.from_dict({"prompt": chosen["prompt_text"].tolist(),
                              "chosen": chosen["response_text"].tolist(),
                              "rejected": rejected["response_text"].tolist()})


def model_dir(name: str, tmp: Path, vocab: int, n_positions: int) -> Path:
    if name == "tiny":
        return SFT
    torch.manual_seed(0)
    path = tmp / name
    AutoModelForCausalLM.from_config(GPT2Config(
        vocab_size=vocab, n_positions=n_positions, n_layer=8, n_embd=512, n_head=8,
        bos_token_id=0, eos_token_id=0)).save_pretrained(path)
    return path


def params_of(model: torch.nn.Module) -> dict[str, int]:
    cfg = model.config
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "layers": cfg.num_hidden_layers, "width": cfg.hidden_size, "vocab": cfg.vocab_size}


# ---- contenders --------------------------------------------------------------------------------
def train_config(steps: int, batch: int, precision: str) -> TrainConfig:
    """conf/base's DPO ``train`` block with the settings both contenders share."""
    block = base_parameters("dpo", CONF)["train"]
    return TrainConfig(**{**block, **LOOP_FEATURES_OFF, "steps": steps, "lr": LR, "batch_size": batch,
                          "grad_accum": 1, "warmup_steps": 2, "schedule": "cosine", "weight_decay": 0.0,
                          "max_grad_norm": 1.0, "seed": 0, "log_every": steps, "progress": False,
                          "device": DEVICE, "precision": precision, "num_processes": 1,
                          "max_tokens_per_batch": None})


def ours(path: Path, items, lengths, collate, loss_fn, steps: int, batch: int,
         precision: str) -> float:
    model = AutoModelForCausalLM.from_pretrained(path)
    disable_dropout(model)
    res = train(ResponseLogps(model), items, lengths, collate, loss_fn,
                train_config(steps, batch, precision))
    return steps * batch / res.seconds


def flops_per_item(path: Path, items, lengths, collate, loss_fn, batch: int, n: int = 4) -> float:
    """Forward + backward FLOPs per item as executed, over the first ``n`` batches of the run."""
    lm = AutoModelForCausalLM.from_pretrained(path)
    disable_dropout(lm)
    model = ResponseLogps(lm)
    batches = iterate_batches(len(items), lengths, batch, 0)
    total, seen = 0.0, 0
    for _ in range(n):
        _, idx = next(batches)
        counter = FlopCounterMode(display=False)
        with counter:
            loss, _ = loss_fn(model, collate([items[i] for i in idx]))
            loss.backward()
        total += counter.get_total_flops()
        seen += len(idx)
    return total / seen


class StepClock(TrainerCallback):
    """Wall time of TRL's optimisation steps (from the first step's start to the last's end)."""

    def __init__(self) -> None:
        self.start = self.end = None

    def on_step_begin(self, args, state, control, **kw):
        if self.start is None:
            self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.end = time.perf_counter()


def trl(path: Path, tok, ds, steps: int, batch: int, setting: dict[str, Any]) -> float:
    from trl import DPOConfig, DPOTrainer

    fp32 = setting.get("bf16") is False
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(output_dir=tmp, max_steps=steps, per_device_train_batch_size=batch,
                         learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=2,
                         max_grad_norm=1.0, beta=BETA, loss_type=["sigmoid"], seed=0,
                         report_to=[], save_strategy="no", use_cpu=DEVICE == "cpu", logging_steps=steps,
                         disable_tqdm=True, max_length=None, dataloader_num_workers=0,
                         **({"model_init_kwargs": {"dtype": torch.float32}} if fp32 else {}),
                         **setting)
        clock = StepClock()
        trainer = DPOTrainer(model=str(path), args=args, train_dataset=ds, processing_class=tok,
                             callbacks=[clock])
        if setting.get("padding_free") and not trainer.padding_free:
            # TRL 1.16 logs a warning and trains with padding: that would be the previous row again
            raise NotImplementedError("TRL turned padding_free off (it falls back to standard "
                                      "padding in this version)")
        trainer.train()
    return steps * batch / (clock.end - clock.start)


def reference_cache_rate(path: Path, tokenized: pd.DataFrame) -> tuple[float, pd.DataFrame]:
    rows = tokenized[tokenized["split"].isin(["train", "val"])].reset_index(drop=True)
    model = AutoModelForCausalLM.from_pretrained(path)
    t0 = time.perf_counter()
    logp, n = response_logps(model, rows["input_ids"].tolist(), rows["response_start"].tolist(),
                              batch_size=64, device=DEVICE, progress=False)
    seconds = time.perf_counter() - t0
    return len(rows) / seconds, reference_table(rows, logp, n)


def sampling_rate(path: Path, tokenized: pd.DataFrame, eos: int, pad: int, prompts: int = 64
                  ) -> float:
    test = tokenized[tokenized["split"] == "test"].drop_duplicates("group_id").head(prompts)
    ids = [list(x[:s]) for x, s in zip(test["input_ids"], test["response_start"], strict=True)]
    cfg = SamplingConfig(n_samples=4, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=48,
                         batch_size=64, seed=0)
    model = AutoModelForCausalLM.from_pretrained(path)
    t0 = time.perf_counter()
    out, _ = generate(model, ids, cfg, eos, pad, device=DEVICE, progress=False)
    seconds = time.perf_counter() - t0
    return sum(len(c) for per_prompt in out for c in per_prompt) / seconds


# ---- one model ---------------------------------------------------------------------------------
def bench_model(name: str, tmp: Path, args, mach: dict[str, Any]) -> dict[str, Any]:
    tok = AutoTokenizer.from_pretrained(TOK)
    tokenized = pd.read_parquet(DATA / "05_model_input/tokenized_examples.parquet")
    pairs = pd.read_parquet(DATA / "03_primary/preference_pairs.parquet")
    sft = AutoModelForCausalLM.from_pretrained(SFT)
    path = model_dir(name, tmp, len(tok), sft.config.n_positions)
    info = params_of(AutoModelForCausalLM.from_pretrained(path))
    pad, eos = tok.pad_token_id, tok.eos_token_id
    print(f"[{name}] {info}", flush=True)

    cache_rate, ref = reference_cache_rate(path, tokenized)
    print(f"[{name}] reference cache {cache_rate:.0f} seq/s", flush=True)
    sample_rate = sampling_rate(path, tokenized, eos, pad)
    print(f"[{name}] sampling {sample_rate:.0f} tokens/s", flush=True)

    # the same train pairs for both sides: the first steps x batch of a seeded shuffle
    n = args.steps * args.batch
    train_pairs = pairs[pairs["split"] == "train"].sample(frac=1.0, random_state=0).head(n)
    items, lengths = preference_items(tokenized, train_pairs, ref, "train")
    chosen = list(zip(train_pairs["group_id"], train_pairs["chosen_index"], strict=True))
    rejected = list(zip(train_pairs["group_id"], train_pairs["rejected_index"], strict=True))
    ds = trl_dataset(train_pairs, chosen, rejected)
    tokens = float(np.mean([len(i.chosen_input_ids) + len(i.rejected_input_ids) for i in items]))
    prompt_tokens = float(np.mean([i.chosen_response_start for i in items]))

    # RPO, K = 4 responses per prompt (targets: a fixed function of the ids; speed only)
    targets = tokenized[["group_id", "response_index"]].assign(
        target=tokenized["input_ids"].map(lambda x: float(np.sum(x) % 7)))
    g_items, g_lengths = group_items(tokenized, ref, targets, "train")
    k_groups = max(args.batch // 2, 1)  # 2 x K sequences per group: as many sequences as DPO
    g_items, g_lengths = g_items[: args.steps * k_groups], g_lengths[: args.steps * k_groups]

    precision = resolve_precision(args.precision, torch.device(DEVICE))
    other = "bf16" if precision == "fp32" else "fp32"
    # bf16 without native support (AVX2: ~1 GFLOP/s) runs --defaults-steps steps: a rate needs no more
    native_bf16 = DEVICE != "cpu" or bool(mach["cpu_bf16_flags"])
    other_steps = args.steps if other == "fp32" or native_bf16 else args.defaults_steps
    dpo_loss = preference_loss_fn("sigmoid", BETA)
    rpo_loss = reward_aware_loss_fn("bwd_kl", 0.05, 1.0)
    runs: dict[str, list[float]] = {"ours": [], f"ours_{other}": [], "rpo_k4_shared": [],
                                    "rpo_k4_unshared": []}
    runs |= {f"trl_{s}": [] for s in TRL_SETTINGS}
    errors: dict[str, str] = {}
    if not native_bf16:
        errors |= {f"trl_{s}": f"skipped: no native bf16 on this CPU ({mach['cpu_capability']}, "
                   f"bf16 matmul {mach['bf16_gflops']:.1f} GFLOP/s)" for s in BF16_SETTINGS}
    for rep in range(args.reps):
        runs["ours"].append(ours(path, items, lengths, policy_collate(), dpo_loss, args.steps,
                                 args.batch, precision))
        if rep < (args.reps if other_steps == args.steps else args.defaults_reps):
            runs[f"ours_{other}"].append(ours(path, items, lengths, policy_collate(), dpo_loss,
                                              other_steps, args.batch, other))
        for s, setting in TRL_SETTINGS.items():
            if f"trl_{s}" in errors or (s == "defaults" and rep >= args.defaults_reps):
                continue
            steps = args.defaults_steps if s == "defaults" else args.steps
            try:
                runs[f"trl_{s}"].append(trl(path, tok, ds, steps, args.batch, setting))
            except Exception as e:  # noqa: BLE001 - a setting that cannot run is a result too
                errors[f"trl_{s}"] = f"{type(e).__name__}: {str(e)[:300]}"
        for shared in (True, False):
            runs[f"rpo_k4_{'shared' if shared else 'unshared'}"].append(
                ours(path, g_items, g_lengths, group_collate(share_prompt=shared), rpo_loss,
                     args.steps, k_groups, precision))
        print(f"[{name}] rep {rep + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in runs.items()
                                                       if v), flush=True)

    med = {k: statistics.median(v) for k, v in runs.items() if v}
    trl_rates = {s: med[f"trl_{s}"] for s in TRL_SETTINGS if f"trl_{s}" in med}
    best = max(trl_rates, key=trl_rates.get)
    flops = flops_per_item(path, items, lengths, policy_collate(), dpo_loss, args.batch)
    peak = mach["fp32_gflops"] if precision == "fp32" else mach[f"{precision}_gflops"]
    return {
        "model": info, "precision": precision, "steps": args.steps, "batch_pairs": args.batch,
        "reps": args.reps, "tokens_per_pair": tokens, "prompt_tokens_per_pair": prompt_tokens,
        "ours_pairs_per_second": med["ours"],
        "ours_other_precision": {"precision": other, "steps": other_steps,
                                 "pairs_per_second": med.get(f"ours_{other}")},
        "cpu_capability": mach["cpu_capability"], "native_bf16": native_bf16,
        "trl_pairs_per_second": trl_rates,
        "trl_errors": errors,
        "trl_best_config": best,
        "ratio_vs_trl_best": med["ours"] / trl_rates[best],
        "ratio_vs_trl_defaults": (med["ours"] / trl_rates["defaults"]
                                  if "defaults" in trl_rates else None),
        "train_gflop_per_pair": flops / 1e9,
        "mfu": flops * med["ours"] / (peak * 1e9),
        "mfu_peak_gflops": peak,
        "rpo_k4_groups_per_second": {"shared_packed": med["rpo_k4_shared"],
                                     "unshared_packed": med["rpo_k4_unshared"]},
        "rpo_k4_sharing_speedup": med["rpo_k4_shared"] / med["rpo_k4_unshared"],
        "reference_cache_sequences_per_second": cache_rate,
        "evaluation_sampling_tokens_per_second": sample_rate,
        "all_repetitions": runs,
    }


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = ["# DPO vs TRL `DPOTrainer` (`python benchmarks/bench_dpo_vs_trl.py`)", "",
             f"{m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, torch "
             f"{m['torch']} ({m['cpu_capability']}); matmul fp32 {m['fp32_gflops']:.1f}, bf16 "
             f"{m['bf16_gflops']:.1f} GFLOP/s. Commit {result['commit'][:10]}. Median of the "
             "repetitions, contenders alternated within each.", ""]
    for name, r in result["models"].items():
        info = r["model"]
        lines += [f"## {name}: {info['parameters'] / 1e6:.1f}M parameters, {info['layers']} x "
                  f"{info['width']}, {r['tokens_per_pair']:.0f} tokens per pair "
                  f"({r['prompt_tokens_per_pair']:.0f} of them the prompt, run once per pair by ours)", "",
                  *([f"{r['settings']['steps']} steps x {r['settings']['batch']} pairs, median of "
                     f"{r['settings']['reps']} alternated repetitions; TRL at its defaults (bf16): "
                     f"{r['settings']['defaults_steps']} step(s), "
                     f"{min(r['settings']['defaults_reps'], r['settings']['reps'])} repetition(s)",
                     ""] if "settings" in r else []),
                  "| contender | pairs/s | ours / it |", "|---|---:|---:|",
                  f"| **ours** ({r['precision']}, packed, prompt shared, cached π_ref; "
                  f"{r['cpu_capability']}) | {r['ours_pairs_per_second']:.2f} | |"]
        o = r.get("ours_other_precision")
        if o and o["pairs_per_second"]:
            lines.append(f"| ours in {o['precision']} ({o['steps']} steps; {r['cpu_capability']}"
                         f"{', native bf16' if r['native_bf16'] else ', no native bf16'}) | "
                         f"{o['pairs_per_second']:.2f} | {r['ours_pairs_per_second'] / o['pairs_per_second']:.2f}x |")
        for s, v in r["trl_pairs_per_second"].items():
            mark = " (best)" if s == r["trl_best_config"] else ""
            lines.append(f"| TRL {s}{mark} ({r.get('cpu_capability', '')}) | {v:.2f} | "
                         f"{r['ours_pairs_per_second'] / v:.2f}x |")
        for s, e in r["trl_errors"].items():
            lines.append(f"| {s} | {e[:140] if e.startswith('skipped') else 'failed: ' + e[:120]} | |")
        g = r["rpo_k4_groups_per_second"]
        lines += ["", f"- MFU {r['mfu']:.1%} ({r['train_gflop_per_pair']:.2f} GFLOP per pair as "
                      f"executed, over the {r['precision']} matmul peak)",
                  f"- RPO K = 4: {g['shared_packed']:.2f} groups/s with the prompt shared in one "
                  f"packed sequence, {g['unshared_packed']:.2f} with one segment per response "
                  f"({r['rpo_k4_sharing_speedup']:.2f}x)",
                  f"- reference cache {r['reference_cache_sequences_per_second']:.0f} sequences/s; "
                  f"evaluation sampling {r['evaluation_sampling_tokens_per_second']:.0f} tokens/s",
                  ""]
    return "\n".join(lines)


def main() -> None:
    global DATA, SFT, TOK, DEVICE
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny", "gpt2-8x512"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--defaults-steps", type=int, default=2,
                    help="steps of TRL at its defaults (bf16: minutes per step without native bf16)")
    ap.add_argument("--defaults-reps", type=int, default=3)
    ap.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16"],
                    help="ours: fp32, or bf16 autocast (fast on CPUs with AVX-512-BF16 or AMX); "
                         "TRL's defaults run bf16 in the same process either way")
    ap.add_argument("--device", default="cpu", help="cpu | cuda (ours and TRL on the same device)")
    ap.add_argument("--data", default=str(DATA), help="a project's data/ after the reference pipeline")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--append", action="store_true",
                    help="add these models to an existing results file (same machine, e.g. a "
                         "second model with other --defaults-* settings)")
    args = ap.parse_args()
    DATA, DEVICE = Path(args.data), args.device
    SFT, TOK = DATA / "06_models/sft_model", DATA / "06_models/tokenizer"
    if not (SFT.exists() and TOK.exists()):
        raise SystemExit(f"{SFT} or {TOK} is missing: run `kedro run --pipelines=reference` first")
    import subprocess

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
                            ).stdout.strip()
    out = Path(args.out)
    result = {"commit": commit, "machine": machine(), "models": {}}
    if args.append and out.with_suffix(".json").exists():
        result["models"] = json.loads(out.with_suffix(".json").read_text())["models"]
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            result["models"][name] = bench_model(name, Path(tmp), args, result["machine"]) | {
                "settings": {"steps": args.steps, "batch": args.batch, "reps": args.reps,
                             "defaults_steps": args.defaults_steps,
                             "defaults_reps": args.defaults_reps}}
            # top-level keys of the issue's contract: the first model's figures
            first = next(iter(result["models"].values()))
            result |= {k: first[k] for k in (
                "ours_pairs_per_second", "trl_pairs_per_second", "trl_best_config",
                "ratio_vs_trl_best", "ratio_vs_trl_defaults", "mfu", "tokens_per_pair")}
            result["model"] = first["model"]
            out.with_suffix(".json").write_text(json.dumps(result, indent=1))
            out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
