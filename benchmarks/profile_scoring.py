"""Where a DPO step's time goes in the packed layout, with and without the prompt shared: the
torch.profiler table of each, the share of matrix products (the FLOPs no layout avoids), and the
speed ratio measured in one run.

    .venv/bin/kedro run --pipelines=reference       # once: tokenizer, tokenized data, SFT model
    .venv/bin/python benchmarks/profile_scoring.py [--reps 5] [--batch 16]

Writes ``benchmarks/results/profile_scoring.json`` and ``.md``.

Two ways to compute the summed response log-probs of a DPO batch (16 pairs = 32 sequences of the
default train data, the same batches for both), each timed as forward + backward of the DPO loss
(training) and as a no-grad forward (the reference cache, reward and evaluation scoring):

- ``unshared``: ``scoring.packed_collate(share_prompt=False)``, one segment per sequence, every
  sequence with its own copy of the prompt;
- ``shared``: each pair one segment, prompt + chosen + rejected (the shipped path).

Alternating: every repetition runs both in turn over the same batches; the median of ``--reps``.
Models: the default SFT model and GPT-2 8 x 512 built from config (as ``bench_dpo_vs_trl.py``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from bench_dpo_vs_trl import DATA, SFT, TOK, machine, model_dir, params_of
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM, AutoTokenizer

from rpo_pipeline.jobs import disable_dropout
from rpo_pipeline.losses import preference_loss_fn
from rpo_pipeline.policy import policy_collate, preference_items
from rpo_pipeline.reference import reference_table, response_logps
from rpo_pipeline.scoring import ResponseLogps
from rpo_pipeline.training import iterate_batches

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks/results/profile_scoring"
VARIANTS = ("unshared", "shared")
MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}


def batches_for(items, lengths, batch: int, n: int) -> dict[str, list[dict]]:
    it = iterate_batches(len(items), lengths, batch, 0)
    chosen = [[items[i] for i in next(it)[1]] for _ in range(n)]
    collates = {"unshared": policy_collate(share_prompt=False), "shared": policy_collate()}
    return {v: [collates[v](b) for b in chosen] for v in VARIANTS}


def step(model, batches, loss_fn, train: bool) -> float:
    t0 = time.perf_counter()
    for b in batches:
        if train:
            loss, _ = loss_fn(model, b)
            loss.backward()
        else:
            with torch.no_grad():
                model(b)
    return time.perf_counter() - t0


def top_ops(model, batches, loss_fn, k: int = 8) -> list[dict]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(model, batches, loss_fn, True)
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in rows)
    matmul = sum(e.self_cpu_time_total for e in rows if e.key in MATMULS) / total
    return {"matmul_share": matmul, "ops": [
        {"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total,
         "calls": e.count} for e in rows[:k]]}


def run_model(name: str, tmp: Path, args) -> dict:
    tok = AutoTokenizer.from_pretrained(TOK)
    tokenized = pd.read_parquet(DATA / "05_model_input/tokenized_examples.parquet")
    pairs = pd.read_parquet(DATA / "03_primary/preference_pairs.parquet")
    path = model_dir(name, tmp, len(tok), AutoModelForCausalLM.from_pretrained(SFT).config.n_positions)
    lm = AutoModelForCausalLM.from_pretrained(path)
    disable_dropout(lm)
    info = params_of(lm)
    rows = tokenized[tokenized["split"] == "train"].reset_index(drop=True)
    logp, n = response_logps(lm, rows["input_ids"].tolist(), rows["response_start"].tolist(),
                              batch_size=64, device="cpu", progress=False)
    items, lengths = preference_items(tokenized, pairs, reference_table(rows, logp, n), "train")
    data = batches_for(items, lengths, args.batch, args.batches)
    models = {v: ResponseLogps(lm) for v in VARIANTS}
    loss_fn = preference_loss_fn("sigmoid", 0.1)
    for v in VARIANTS:  # warm-up
        step(models[v], data[v][:1], loss_fn, True)
    times = {f"{mode}_{v}": [] for mode in ("train", "score") for v in VARIANTS}
    for rep in range(args.reps):
        for mode in ("train", "score"):
            for v in VARIANTS:
                lm.zero_grad(set_to_none=True)
                times[f"{mode}_{v}"].append(step(models[v], data[v], loss_fn, mode == "train"))
        print(f"[{name}] rep {rep + 1}: " + ", ".join(f"{k} {t[-1]:.2f}s" for k, t in times.items()),
              flush=True)
    med = {k: statistics.median(t) for k, t in times.items()}
    seqs = 2 * args.batch * args.batches
    ratios = {}
    for mode in ("train", "score"):
        ratios[f"{mode}_shared_vs_unshared"] = med[f"{mode}_unshared"] / med[f"{mode}_shared"]
    profiles = {v: top_ops(models[v], data[v][:2], loss_fn) for v in VARIANTS}
    return {"model": info, "sequences": seqs, "seconds_median": med,
            "sequences_per_second": {k: seqs / t for k, t in med.items()}, "ratios": ratios,
            "profile_top_ops": profiles, "all_repetitions": times}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# Profile: a DPO step in the packed layout (`python benchmarks/profile_scoring.py`)",
             "", f"{m['cpu']}, {m['torch_threads']} torch threads, torch {m['torch']} "
             f"({m['cpu_capability']}). Commit {result['commit'][:10]}. {result['batches']} batches "
             f"of {result['batch']} pairs; median of {result['reps']} alternated repetitions. "
             "`unshared`: one packed segment per sequence; `shared`: one per pair, the prompt once "
             "(shipped).", ""]
    for name, r in result["models"].items():
        info, sps, q = r["model"], r["sequences_per_second"], r["ratios"]
        lines += [f"## {name}: {info['parameters'] / 1e6:.1f}M parameters, {info['layers']} x "
                  f"{info['width']}, vocabulary {info['vocab']}", "",
                  "| | unshared | shared | shared / unshared |", "|---|---:|---:|---:|"]
        for mode, label in (("train", "train fwd+bwd, seq/s"), ("score", "no-grad scoring, seq/s")):
            lines.append(f"| {label} | {sps[f'{mode}_unshared']:.0f} | {sps[f'{mode}_shared']:.0f} | "
                         f"{q[f'{mode}_shared_vs_unshared']:.2f}x |")
        for v, prof in r["profile_top_ops"].items():
            lines += ["", f"torch.profiler, {v}, one training pass over 2 batches (self CPU time; "
                      f"matrix products {prof['matmul_share']:.0%}):", "",
                      "| op | ms | share | calls |", "|---|---:|---:|---:|"]
            lines += [f"| `{o['op']}` | {o['self_ms']:.1f} | {o['share']:.0%} | {o['calls']} |"
                      for o in prof["ops"]]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    global DATA, SFT, TOK
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny", "gpt2-8x512"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--data", default=str(DATA), help="a project's data/ after the reference pipeline")
    args = ap.parse_args()
    DATA = Path(args.data)
    SFT, TOK = DATA / "06_models/sft_model", DATA / "06_models/tokenizer"
    import bench_dpo_vs_trl  # model_dir("tiny") reads its SFT

    bench_dpo_vs_trl.DATA, bench_dpo_vs_trl.SFT, bench_dpo_vs_trl.TOK = DATA, SFT, TOK
    if not (SFT.exists() and TOK.exists()):
        raise SystemExit(f"{SFT} or {TOK} is missing: run `kedro run --pipelines=reference` first")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    result = {"commit": commit, "machine": machine(), "reps": args.reps, "batch": args.batch,
              "batches": args.batches, "models": {}}
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            result["models"][name] = run_model(name, Path(tmp), args)
            out.with_suffix(".json").write_text(json.dumps(result, indent=1))
            out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
