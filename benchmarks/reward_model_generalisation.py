"""Does the reward model hold up on the policies' own samples? Variants of the neural reward model
against a bag-of-words Bradley–Terry baseline, chosen on the val split.

    .venv/bin/python benchmarks/reward_model_generalisation.py [--env base] [--split val]
        [--policies sft_model rpo_online.policy_model] [--variants last mean mean_all ...]
        [--project DIR --generated --tag _imdb]

Needs a finished run of the env (its catalog: tokenized examples, pairs, groups, the SFT model and
the policies named). For each policy it samples ``--n-samples`` completions per prompt of
``--split`` (the evaluation's sampler, seed 0) and judges them with VADER (the gold judge). Each
reward model variant trains on the train split (the pipeline's trainer, the run's parameters with
the variant's overrides) and is measured by:

- ``pair_accuracy``: on the split's preference pairs (the data's best vs worst);
- ``spearman/<policy>``: rank correlation of its score and gold over the policy's samples;
- ``sample_pair_accuracy/<policy>``: over pairs of one prompt's samples whose gold differs, the
  share it orders like gold.

The bag-of-words baseline is a logistic regression on the difference of the two responses' word
counts (Bradley–Terry with a linear reward), on best-vs-worst pairs and on every ordered pair.
Writes ``benchmarks/results/reward_model_generalisation.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks/results"

# The reward model before this benchmark: last-token features, best-vs-worst pairs, 100 steps.
BEFORE = {"pooling": "last", "comparisons": "pairs", "train.steps": 100, "train.lr": 1.0e-3,
          "train.batch_size": 16, "ensemble.members": 1}
GROUPS = {"pooling": "mean", "comparisons": "all", "train.batch_size": 8, "train.lr": 3.0e-3}
VARIANTS: dict[str, dict[str, Any]] = {
    "last": {},
    "mean": {"pooling": "mean"},
    "mean_300": {"pooling": "mean", "train.steps": 300},
    "mean_lr3e-3": {"pooling": "mean", "train.lr": 3.0e-3},
    "mean_lr1e-2": {"pooling": "mean", "train.lr": 1.0e-2},
    "mean_300_lr3e-3": {"pooling": "mean", "train.steps": 300, "train.lr": 3.0e-3},
    "mean_fp32": {"pooling": "mean", "load_in_4bit": False},
    # every ordered pair of a group as its own item (12 183 train pairs)
    "last_all_pairs": {"comparisons": "all", "expand_pairs": True},
    "mean_all_pairs": {"pooling": "mean", "comparisons": "all", "expand_pairs": True},
    "mean_all_pairs_300": {"pooling": "mean", "comparisons": "all", "train.steps": 300, "expand_pairs": True},
    "mean_all_pairs_lr3e-4": {"pooling": "mean", "comparisons": "all", "train.lr": 3.0e-4, "expand_pairs": True},
    "mean_all_pairs_fp32": {"pooling": "mean", "comparisons": "all", "load_in_4bit": False, "expand_pairs": True},
    "mean_all_pairs_bs64_lr3e-3": {"pooling": "mean", "comparisons": "all", "train.batch_size": 64,
                                   "train.lr": 3.0e-3, "expand_pairs": True},
    "mean_all_pairs_300_lr3e-3": {"pooling": "mean", "comparisons": "all", "train.steps": 300,
                                  "train.lr": 3.0e-3, "expand_pairs": True},
    # every comparison of a group in one item (InstructGPT), each response run once
    "groups_bs8": GROUPS,
    "last_groups_bs8": GROUPS | {"pooling": "last"},
    "groups_bs16": GROUPS | {"train.batch_size": 16},
    "groups_bs8_150": GROUPS | {"train.steps": 150},
    "groups_bs8_150_lr5e-3": GROUPS | {"train.steps": 150, "train.lr": 5.0e-3},
    "groups_bs8_200": GROUPS | {"train.steps": 200},
    # ensembles: N reward models trained one after another, or the pipeline's N adapters on the
    # one backbone trained together (reward_model.ensemble.members)
    "groups_bs8_200_adapters3": GROUPS | {"train.steps": 200, "ensemble.members": 3, "separate": True},
    "groups_bs8_150_ensemble3": GROUPS | {"train.steps": 150, "ensemble.members": 3},
    # --env=imdb (longer texts, a weaker backbone): more steps, a larger step size, more capacity
    "groups_bs8_500": GROUPS | {"train.steps": 500},
    "groups_bs8_500_lr1e-2": GROUPS | {"train.steps": 500, "train.lr": 1.0e-2},
    "groups_bs8_500_r64_all_linear": GROUPS | {"train.steps": 500, "lora.r": 64, "lora.alpha": 128,
                                               "lora.target_modules": "all-linear"},
    "groups_bs8_500_fp32": GROUPS | {"train.steps": 500, "load_in_4bit": False},
    "mean_pairs_500": {"pooling": "mean", "train.steps": 500, "train.lr": 3.0e-3},
    "groups_bs8_1000": GROUPS | {"train.steps": 1000},
    # the head on the mean of the vocabulary logits: close to a bag of the (next) words
    "groups_bs8_150_logits": GROUPS | {"train.steps": 150, "head_input": "logits"},
    "groups_bs8_500_logits": GROUPS | {"train.steps": 500, "head_input": "logits"},
    # a full fine-tune of the (tiny) backbone in full precision instead of LoRA on the 4-bit one
    "groups_bs8_300_full_lr3e-4": GROUPS | {"train.steps": 300, "train.lr": 3.0e-4, "load_in_4bit": False,
                                            "finetune": "full"},
    "groups_bs8_300_full_lr1e-3": GROUPS | {"train.steps": 300, "train.lr": 1.0e-3, "load_in_4bit": False,
                                            "finetune": "full"},
    "groups_bs8_300_full_lr3e-3": GROUPS | {"train.steps": 300, "train.lr": 3.0e-3, "load_in_4bit": False,
                                            "finetune": "full"},
    "groups_bs8_600_full_lr1e-3": GROUPS | {"train.steps": 600, "train.lr": 1.0e-3, "load_in_4bit": False,
                                            "finetune": "full"},
    # LoRA on the token embeddings too: a per-token update, what a bag of words learns
    "groups_bs8_500_wte": GROUPS | {"train.steps": 500,
                                    "lora.target_modules": ["c_attn", "c_proj", "c_fc", "wte"]},
}


def _set(d: dict[str, Any], dotted: str, value: Any) -> None:
    *head, last = dotted.split(".")
    for k in head:
        d = d[k]
    d[last] = value


def policy_samples(handle, tok, prompts: pd.DataFrame, n: int, gold_fn) -> pd.DataFrame:
    from rpo_pipeline.evaluation import generate
    from rpo_pipeline.params import SamplingConfig

    cfg = SamplingConfig(n_samples=n, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=48,
                         batch_size=128, seed=0)
    model = handle.load()
    comps, _ = generate(model, prompts["prompt_ids"].tolist(), cfg, tok.eos_token_id,
                        tok.pad_token_id)
    rows = []
    for gid, prompt, cs in zip(prompts["group_id"], prompts["prompt_ids"], comps, strict=True):
        for k, c in enumerate(cs):
            rows.append((gid, k, list(prompt) + list(c), len(prompt),
                         tok.decode(c, skip_special_tokens=True).strip()))
    out = pd.DataFrame(rows, columns=["group_id", "response_index", "input_ids", "response_start",
                                      "text"])
    return out.assign(gold=gold_fn(out["text"].tolist()))


def agreement(samples: pd.DataFrame, score: str) -> tuple[float, float]:
    from rpo_pipeline.evaluation import rm_gold_agreement

    a = rm_gold_agreement(samples.rename(columns={score: "rm"}))
    return a["rm_gold_spearman"], a["rm_gold_pair_accuracy"]


def bag_of_words(pairs_train: pd.DataFrame, pairs_eval: pd.DataFrame, samples: dict[str, pd.DataFrame]
                 ) -> dict[str, float]:
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    vec = CountVectorizer(lowercase=True).fit(pd.concat([pairs_train["chosen"], pairs_train["rejected"]]))
    d = (vec.transform(pairs_train["chosen"]) - vec.transform(pairs_train["rejected"]))
    from scipy.sparse import vstack

    x = vstack([d, -d])
    y = np.r_[np.ones(d.shape[0]), np.zeros(d.shape[0])]
    clf = LogisticRegression(fit_intercept=False, C=1.0, max_iter=2000).fit(x, y)
    w = clf.coef_[0]
    de = vec.transform(pairs_eval["chosen"]) - vec.transform(pairs_eval["rejected"])
    out = {"pair_accuracy": float(np.mean(de @ w > 0))}
    for name, s in samples.items():
        sc = s.assign(bow=vec.transform(s["text"]) @ w)
        out[f"spearman/{name}"], out[f"sample_pair_accuracy/{name}"] = agreement(sc, "bow")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--env", default="base")
    ap.add_argument("--split", default="val")
    ap.add_argument("--policies", nargs="+", default=["sft_model", "rpo_online.policy_model"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--n-samples", type=int, default=4)
    ap.add_argument("--tag", default="")
    ap.add_argument("--project", type=Path, default=ROOT,
                    help="the project whose finished run is read (e.g. a copy that ran --env=imdb)")
    ap.add_argument("--generated", action="store_true",
                    help="a --pipelines=generated run: train and evaluate on its generated preferences")
    args = ap.parse_args()
    os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")
    torch.set_num_threads(torch.get_num_threads())

    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    from rpo_pipeline.evaluation import vader_positivity
    from rpo_pipeline.jobs import RewardModelJob, Split
    from rpo_pipeline.params import RewardModelParams
    from rpo_pipeline.preference_groups import groups_to_pairs
    from rpo_pipeline.reward_model import (
        RewardModelConfig,
        ensemble_reward,
        reward_pair_items,
        score,
        training_items,
        with_bootstrap,
    )

    bootstrap_project(args.project)
    with KedroSession.create(project_path=args.project, env=args.env) as session:
        ctx = session.load_context()
        cat = ctx.catalog
        params = ctx.params["reward_model"]
        if args.generated:  # --pipelines=generated: π_SFT's judged samples are the data
            tokenized, pairs = cat.load("generated.tokenized_examples"), cat.load("generated.preference_pairs")
            groups = cat.load("generated_preferences")
        else:
            tokenized, pairs = cat.load("tokenized_examples"), cat.load("preference_pairs")
            groups = cat.load("preference_groups")
        prompts = cat.load("tokenized_prompts")
        tok_handle, sft = cat.load("tokenizer"), cat.load("sft_model")
        handles = {name: cat.load(name) for name in args.policies}
    tok = tok_handle.load()
    split_prompts = prompts[prompts["split"] == args.split].reset_index(drop=True)
    t0 = time.perf_counter()
    samples = {name.split(".")[0]: policy_samples(h, tok, split_prompts, args.n_samples, vader_positivity)
               for name, h in handles.items()}
    print(f"samples: {sum(len(s) for s in samples.values())} in {time.perf_counter() - t0:.1f} s; "
          + ", ".join(f"{k} gold {s['gold'].mean():.3f}" for k, s in samples.items()), flush=True)

    all_pairs = groups_to_pairs(groups, rejected="all")
    results: dict[str, dict[str, float]] = {}
    for comp, train_pairs in (("pairs", pairs), ("all", all_pairs)):
        t0 = time.perf_counter()
        r = bag_of_words(train_pairs[train_pairs["split"] == "train"],
                         pairs[pairs["split"] == args.split], samples)
        results[f"bag_of_words_{comp}"] = r | {"seconds": time.perf_counter() - t0,
                                              "train_pairs": int((train_pairs["split"] == "train").sum())}
        print(f"bag_of_words_{comp}", json.dumps(results[f"bag_of_words_{comp}"]), flush=True)

    for name in args.variants:
        over = BEFORE | VARIANTS[name]
        p_dict = json.loads(json.dumps(params))
        for k, v in over.items():
            if k not in ("expand_pairs", "separate"):
                _set(p_dict, k, v)
        p_dict["train"]["progress"] = False
        p = RewardModelParams.parse(p_dict)
        members, separate = p.ensemble.members, over.get("separate", False)
        config = RewardModelConfig(backbone_path=str(sft.path), load_in_4bit=p.load_in_4bit,
                                   compute_dtype=p.compute_dtype, head_input=p.head_input,
                                   pooling=p.pooling, members=1 if separate else members,
                                   finetune=p.finetune,
                                   lora_r=p.lora.r, lora_alpha=p.lora.alpha,
                                   lora_dropout=p.lora.dropout, target_modules=p.lora.target_modules)
        if over.get("expand_pairs"):
            items = reward_pair_items(tokenized, all_pairs, "train")
        else:
            items = training_items(tokenized, pairs, groups, p.comparisons)
        val = {args.split: Split(*reward_pair_items(tokenized, pairs, args.split))}
        t0 = time.perf_counter()
        if separate:  # N reward models, each with its seed and its bootstrap resample
            models, accs = [], []
            for m in range(members):
                boot = with_bootstrap(items[0], members, p.train.seed)
                mine = [i._replace(member_weights=()) for i, w in zip(boot, [b.member_weights[m] for b in boot],
                                                                      strict=True) for _ in range(int(w))]
                lengths = [items[1][k] for k, b in enumerate(boot) for _ in range(int(b.member_weights[m]))]
                pm = p.model_copy(update={"train": p.train.model_copy(update={"seed": p.train.seed + m})})
                model, _, ev = RewardModelJob(config=config, params=pm, train=Split(mine, lengths),
                                              evals=val).run()
                models.append(model)
                accs.append(ev[f"{args.split}_accuracy"])
            acc = float(np.mean(accs))
        else:
            boot = with_bootstrap(items[0], members, p.train.seed) if members > 1 else items[0]
            model, _, ev = RewardModelJob(config=config, params=p, train=Split(boot, items[1]),
                                          evals=val).run()
            models, acc = [model], ev[f"{args.split}_accuracy"]
        r = {"pair_accuracy": acc, "train_seconds": time.perf_counter() - t0,
             "train_pairs": len(items[0])}
        for pol, s in samples.items():
            ts = time.perf_counter()
            scores = np.concatenate([score(m, s["input_ids"].tolist(), s["response_start"].tolist())
                                     for m in models], axis=1)
            r[f"score_seconds/{pol}"] = time.perf_counter() - ts
            mean, std = ensemble_reward(scores)
            r[f"spearman/{pol}"], r[f"sample_pair_accuracy/{pol}"] = agreement(s.assign(rm=mean), "rm")
            if scores.shape[1] > 1:
                r[f"member_std/{pol}"] = float(std.mean())
                r[f"member_spearman/{pol}"] = float(np.mean([agreement(s.assign(rm=scores[:, k]), "rm")[0]
                                                             for k in range(scores.shape[1])]))
                for agg in ("min", "mean_minus_std"):
                    a = ensemble_reward(scores, agg, penalty=1.0)[0]
                    r[f"spearman_{agg}/{pol}"] = agreement(s.assign(rm=a), "rm")[0]
        results[name] = r | {"overrides": VARIANTS[name]}
        print(name, json.dumps(results[name]), flush=True)

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"reward_model_generalisation{args.tag}.json"
    out = {"split": args.split, "env": args.env, "n_samples": args.n_samples,
           "machine": {"cpu": platform.processor() or platform.machine(),
                       "capability": torch.backends.cpu.get_cpu_capability(),
                       "threads": torch.get_num_threads(), "torch": torch.__version__},
           "samples_gold_mean": {k: float(s["gold"].mean()) for k, s in samples.items()},
           "results": {}}
    if path.exists():  # earlier variants stay (rerun ones are replaced)
        out["results"] = json.loads(path.read_text())["results"]
    out["results"] |= results
    path.write_text(json.dumps(out, indent=2) + "\n")
    path.with_suffix(".md").write_text(markdown(out))
    print(markdown(out))


def markdown(out: dict[str, Any]) -> str:
    pols = list(out["samples_gold_mean"])
    cols = ["pair_accuracy", *[f"{m}/{pol}" for pol in pols for m in ("spearman", "sample_pair_accuracy")]]
    lines = [f"# Reward model on the policies' own samples ({out['env']}, {out['split']} split, "
             f"{out['n_samples']} samples per prompt, {out['machine']['capability']} fp32, "
             f"{out['machine']['threads']} threads)", "",
             "Spearman: rank correlation of the reward model's score with gold (VADER) over the "
             "samples of π_SFT (`sft_model`) and of a trained online-RPO policy (`rpo_online`); "
             "sample pair accuracy: over two samples of one prompt whose gold differs, the share it "
             "orders like gold. Variants: `benchmarks/reward_model_generalisation.py`.", "",
             "| variant | train items | train s | " + " | ".join(cols) + " |",
             "|---|---:|---:|" + "---:|" * len(cols)]
    for name, r in out["results"].items():
        secs = r.get("train_seconds", r.get("seconds", float("nan")))
        mark = " *" if "note" in r else ""
        lines.append(f"| {name} | {r['train_pairs']} | {secs:.1f}{mark} | "
                     + " | ".join(f"{r[c]:.3f}" for c in cols) + " |")
    notes = [f"{name}: {r['note']}" for name, r in out["results"].items() if "note" in r]
    return "\n".join(lines + ([""] + [f"\\* {n}" for n in notes] if notes else [])) + "\n"


if __name__ == "__main__":
    main()
