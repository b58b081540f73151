"""Where a DPO step's time goes, before and after prefix sharing and response-only logits: the
torch.profiler table of each, and each change's speed ratio measured in one run.

    .venv/bin/kedro run --pipelines=reference       # once: tokenizer, tokenized data, SFT model
    .venv/bin/python benchmarks/profile_scoring.py [--reps 5] [--batch 16]

Writes ``benchmarks/results/profile_scoring.json`` and ``.md``.

Three ways to compute the summed response log-probs of a DPO batch (16 pairs = 32 sequences of
the default train data, the same batches for all three), each timed as forward + backward of the
DPO loss (training) and as a no-grad forward (the reference cache, reward and evaluation scoring):

- ``before``: the computation before issue 13 (``batching.batch_response_logps`` at e1544b4, kept as
  ``ResponseLogps(full_logits=True)`` on whole rows): one padded row per sequence, logits over
  the whole vocabulary at every position, cross-entropy against the next token, masked;
- ``sliced``: LM head only at the positions that predict a response token (``scoring``), every
  sequence still carrying its own copy of the prompt (``share=False``);
- ``shared``: that, and each distinct prompt run once (the shipped path).

Alternating: every repetition runs the three in turn over the same batches; the median of
``--reps``. Models: the default SFT model and GPT-2 8 x 512 built from config (as
``bench_dpo_vs_trl.py``).
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
VARIANTS = ("before", "sliced", "shared")


def batches_for(items, lengths, pad: int, batch: int, n: int) -> dict[str, list[dict]]:
    it = iterate_batches(len(items), lengths, batch, 0)
    chosen = [[items[i] for i in next(it)[1]] for _ in range(n)]
    rows = policy_collate(pad, share_prefix=False)
    collates = {"before": rows, "sliced": rows, "shared": policy_collate(pad, share_prefix=True)}
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
    return [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3,
             "share": e.self_cpu_time_total / total, "calls": e.count} for e in rows[:k]]


def run_model(name: str, tmp: Path, args) -> dict:
    tok = AutoTokenizer.from_pretrained(TOK)
    tokenized = pd.read_parquet(DATA / "05_model_input/tokenized_examples.parquet")
    pairs = pd.read_parquet(DATA / "03_primary/preference_pairs.parquet")
    path = model_dir(name, tmp, len(tok), AutoModelForCausalLM.from_pretrained(SFT).config.n_positions)
    lm = AutoModelForCausalLM.from_pretrained(path)
    disable_dropout(lm)
    info = params_of(lm)
    pad = tok.pad_token_id
    rows = tokenized[tokenized["split"] == "train"].reset_index(drop=True)
    logp, n = response_logps(lm, rows["input_ids"].tolist(), rows["response_start"].tolist(), pad,
                              batch_size=64, device="cpu", progress=False)
    items, lengths = preference_items(tokenized, pairs, reference_table(rows, logp, n), "train")
    data = batches_for(items, lengths, pad, args.batch, args.batches)
    models = {"before": ResponseLogps(lm, full_logits=True), "sliced": ResponseLogps(lm),
              "shared": ResponseLogps(lm)}
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
        ratios[f"{mode}_sliced_vs_before"] = med[f"{mode}_before"] / med[f"{mode}_sliced"]
        ratios[f"{mode}_shared_vs_sliced"] = med[f"{mode}_sliced"] / med[f"{mode}_shared"]
        ratios[f"{mode}_shared_vs_before"] = med[f"{mode}_before"] / med[f"{mode}_shared"]
    profiles = {v: top_ops(models[v], data[v][:2], loss_fn) for v in ("before", "shared")}
    return {"model": info, "sequences": seqs, "seconds_median": med,
            "sequences_per_second": {k: seqs / t for k, t in med.items()}, "ratios": ratios,
            "profile_top_ops": profiles, "all_repetitions": times}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# Profile: a DPO step before and after issue 13 (`python benchmarks/profile_scoring.py`)",
             "", f"{m['cpu']}, {m['torch_threads']} torch threads, torch {m['torch']}. Commit "
             f"{result['commit'][:10]}. {result['batches']} batches of {result['batch']} pairs; "
             f"median of {result['reps']} alternated repetitions. `before`: full-vocabulary logits "
             "at every position, the prompt once per sequence; `sliced`: LM head at response "
             "positions only; `shared`: that + each prompt once (shipped).", ""]
    for name, r in result["models"].items():
        info, sps, q = r["model"], r["sequences_per_second"], r["ratios"]
        lines += [f"## {name}: {info['parameters'] / 1e6:.1f}M parameters, {info['layers']} x "
                  f"{info['width']}, vocabulary {info['vocab']}", "",
                  "| | before | sliced | shared | sliced / before | shared / sliced | shared / before |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for mode, label in (("train", "train fwd+bwd, seq/s"), ("score", "no-grad scoring, seq/s")):
            lines.append(f"| {label} | {sps[f'{mode}_before']:.0f} | {sps[f'{mode}_sliced']:.0f} | "
                         f"{sps[f'{mode}_shared']:.0f} | {q[f'{mode}_sliced_vs_before']:.2f}x | "
                         f"{q[f'{mode}_shared_vs_sliced']:.2f}x | {q[f'{mode}_shared_vs_before']:.2f}x |")
        for v, ops in r["profile_top_ops"].items():
            lines += ["", f"torch.profiler, {v}, one training pass over 2 batches (self CPU time):",
                      "", "| op | ms | share | calls |", "|---|---:|---:|---:|"]
            lines += [f"| `{o['op']}` | {o['self_ms']:.1f} | {o['share']:.0%} | {o['calls']} |"
                      for o in ops]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny", "gpt2-8x512"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
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
