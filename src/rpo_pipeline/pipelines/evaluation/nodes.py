"""evaluation nodes: sample from each policy, score the samples, compare with the reference.

Thin wrappers over ``rpo_pipeline.evaluation`` (generation, judges, metrics) and
``rpo_pipeline.reporting`` (plots, Markdown).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pandas as pd

from rpo_pipeline import reporting
from rpo_pipeline.datasets import ModelSource, PretrainedHandle
from rpo_pipeline.evaluation import (
    eval_prompts,
    gold_at_matched_kl,
    make_gold_judge,
    policy_metrics,
    preference_accuracy,
)
from rpo_pipeline.jobs import CompletionLogpsJob, GenerateJob, RewardsJob, infer
from rpo_pipeline.mlflow_models import POLICY, ModelBundle, data_example, text_format
from rpo_pipeline.params import DataProcessingParams, EvaluationParams
from rpo_pipeline.policy import pair_sides
from rpo_pipeline.precision import resolve_precision
from rpo_pipeline.reward_model import ensemble_reward
from rpo_pipeline.tracking import PRECISION_BITS, MetricsPayload, scalars
from rpo_pipeline.training import resolve_device

log = logging.getLogger(__name__)
REFERENCE = "reference"
METRICS = ("gold_reward_mean", "rm_score_mean", "kl_to_reference", "win_rate_gold", "win_rate_rm",
           "preference_accuracy", "length_mean", "distinct_2", "rm_gold_spearman", "rm_gold_pair_accuracy")


def _completion_logps(model: PretrainedHandle, prompts: list[list[int]],
                       completions: list[list[int]], p: EvaluationParams) -> np.ndarray:
    """``evaluation.completion_logps``, sharded by batch over ``evaluation.num_processes``."""
    job = CompletionLogpsJob(model_path=str(model.path), device=p.device, precision=p.precision,
                             prompts=prompts, completions=completions, batch_size=p.batch_size)
    return infer(job, p.num_processes, p.backend, model.load)


def sample_policy(model: PretrainedHandle, tokenizer: PretrainedHandle,
                  tokenized_prompts: pd.DataFrame, params: dict[str, Any]) -> pd.DataFrame:
    """N seeded samples and one greedy completion per test prompt, with log π(y|x).

    One row per completion: group_id, sample (0..N-1; -1 = greedy), prompt_ids, completion_ids,
    logp. Every policy gets the same prompts, settings and seeds.
    """
    t0 = time.perf_counter()
    p = EvaluationParams.parse(params)
    cfg = p.sampling
    tok = tokenizer.load()
    prompts = eval_prompts(tokenized_prompts, p.split, p.max_prompts)
    ids = prompts["prompt_ids"].tolist()
    name = model.path.name
    lm = model.load() if p.num_processes == 1 else None

    def run(greedy: bool) -> tuple[list, list]:
        job = GenerateJob(model_path=str(model.path), device=p.device, precision=p.precision, prompts=ids,
                          cfg=cfg, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                          greedy=greedy, progress=p.progress,
                          desc=f"{'greedy' if greedy else 'sample'} {name}")
        return infer(job, p.num_processes, p.backend, lambda: lm)

    sampled, s_logp = run(greedy=False)
    greedy, g_logp = run(greedy=True)
    rows = []
    for gid, p, samples, lps, g, glp in zip(prompts["group_id"], ids, sampled, s_logp, greedy,
                                             g_logp, strict=True):
        rows += [(gid, k, p, c, lp) for k, (c, lp) in enumerate(zip(samples, lps, strict=True))]
        rows.append((gid, -1, p, g[0], glp[0]))
    log.info("%s: %d prompts x %d samples + greedy in %.1f s", name, len(ids), cfg.n_samples,
             time.perf_counter() - t0)
    return pd.DataFrame(rows, columns=["group_id", "sample", "prompt_ids", "completion_ids", "logp"])


def score_samples(reference_model: PretrainedHandle, reward_model: PretrainedHandle,
                  tokenizer: PretrainedHandle, groups: pd.DataFrame, gold_judge_model: ModelSource,
                  params: dict[str, Any],
                  **samples: pd.DataFrame) -> pd.DataFrame:
    """All policies' completions with text, gold score, reward-model score and log π_ref(y|x).

    ``samples`` maps a policy name to its ``sample_policy`` table; ``reference`` must be one of
    them (its log π_ref is its own log π).
    """
    t0 = time.perf_counter()
    p = EvaluationParams.parse(params)
    if REFERENCE not in samples:
        raise ValueError(f"evaluation needs the {REFERENCE!r} samples, got {sorted(samples)}")
    tok = tokenizer.load()
    eos = tok.eos_token_id
    table = pd.concat([s.assign(policy=name) for name, s in samples.items()], ignore_index=True)
    comp = table["completion_ids"].map(list)
    table["completion"] = tok.batch_decode(comp.tolist(), skip_special_tokens=True)
    table["completion"] = table["completion"].str.strip()
    table["tokens"] = comp.map(lambda c: len(c) - int(len(c) > 0 and c[-1] == eos))
    table["finished"] = comp.map(lambda c: len(c) > 0 and c[-1] == eos)
    prompts = groups.set_index("group_id")["prompt"]
    table.insert(1, "prompt", prompts.reindex(table["group_id"]).to_numpy())

    judge = make_gold_judge(p.gold_judge, p.gold_judge_args, gold_judge_model.name_or_path)
    table["gold"] = judge(table["completion"].tolist()) if judge is not None else np.nan

    seqs = [list(p) + c for p, c in zip(table["prompt_ids"], comp, strict=True)]
    members = infer(RewardsJob(model_path=str(reward_model.path), device=p.device, precision=p.precision,
                               sequences=seqs,
                               response_starts=table["prompt_ids"].map(len).tolist(),
                               batch_size=p.batch_size), p.num_processes, p.backend,
        lambda: reward_model.load(device=p.device))
    table["rm"], table["rm_std"] = ensemble_reward(members)  # the members' mean and spread

    table["ref_logp"] = table["logp"]
    others = (table["policy"] != REFERENCE).to_numpy()
    if others.any():
        table.loc[others, "ref_logp"] = _completion_logps(
            reference_model, table.loc[others, "prompt_ids"].map(list).tolist(),
            comp[others].tolist(), p)
    table["kl"] = table["logp"] - table["ref_logp"]
    log.info("scored %d completions of %s in %.1f s", len(table), list(samples),
             time.perf_counter() - t0)
    return table.drop(columns=["prompt_ids", "completion_ids"])


def pair_accuracy(reference_model: PretrainedHandle, tokenizer: PretrainedHandle,
                  tokenized: pd.DataFrame, pairs: pd.DataFrame, params: dict[str, Any],
                  **policies: PretrainedHandle) -> dict[str, float]:
    """Share of test pairs each policy's implicit reward β·log(π/π_ref) ranks right (ties half).

    The reference's implicit reward is zero everywhere, so its accuracy is 0.5 by definition.
    """
    p = EvaluationParams.parse(params)
    chosen, rejected = pair_sides(tokenized, pairs, p.split)
    if chosen.empty:  # e.g. preferences generated for train/val prompts only
        log.info("no %s pairs: no preference accuracy", p.split)
        return {name: float("nan") for name in [REFERENCE, *policies]}
    both = pd.concat([chosen, rejected], ignore_index=True)
    prompts = [list(ids[:s]) for ids, s in zip(both["input_ids"], both["response_start"], strict=True)]
    comps = [list(ids[s:]) for ids, s in zip(both["input_ids"], both["response_start"], strict=True)]

    def logps(handle: PretrainedHandle) -> np.ndarray:
        return _completion_logps(handle, prompts, comps, p)

    ref = logps(reference_model)
    n = len(chosen)
    out = {REFERENCE: preference_accuracy(np.zeros(n))}
    for name, handle in policies.items():
        ratio = logps(handle) - ref
        out[name] = preference_accuracy(ratio[:n] - ratio[n:])
    log.info("test-pair preference accuracy (%d pairs): %s", n, out)
    return out


def score_curves(reference_model: PretrainedHandle, reward_model: PretrainedHandle,
                 tokenizer: PretrainedHandle, tokenized_prompts: pd.DataFrame,
                 gold_judge_model: ModelSource, params: dict[str, Any], **points: Any
                 ) -> tuple[pd.DataFrame, MetricsPayload]:
    """Over-optimisation curves (Gao et al., arXiv 2210.10760): gold, reward-model score and KL
    to the reference of each method's policies along training, on ``curve.prompts`` val prompts.

    ``points`` holds, per method, ``<method>__steps`` (its ``train.steps``) and
    ``<method>__curve`` (the intermediate policies by step, a ``PretrainedDirsDataset``) and
    ``<method>__final`` (the trained policy), or ``rpo_online__round_<r>`` (round r's policy, at
    r × its steps per round). The
    reference is every method's step 0. All samples share prompts and seeds (``evaluation.sampling``)
    and are scored together. Returns the table (method, step, gold, rm, kl, sqrt_kl, samples) and
    each method's gold at the KL every method reaches (``curve.<method>.gold_at_matched_kl``).
    """
    t0 = time.perf_counter()
    p = EvaluationParams.parse(params)
    tok = tokenizer.load()
    prompts = eval_prompts(tokenized_prompts, "val", p.curve.prompts)["prompt_ids"].tolist()
    steps = {k.partition("__")[0]: int(v) for k, v in points.items() if k.endswith("__steps")}
    policies: dict[tuple[str, int], PretrainedHandle] = {}
    for key, value in points.items():
        method, _, what = key.partition("__")
        if what == "steps":
            continue
        if what == "curve":
            policies |= {(method, int(step)): h for step, h in value.items()}
        elif what == "final":
            policies[(method, steps[method])] = value
        else:  # round_<r>
            policies[(method, int(what.split("_")[1]) * steps[method])] = value
    runs = {("reference", 0): reference_model} | dict(sorted(policies.items()))
    rows = []
    for (method, step), handle in runs.items():
        job = GenerateJob(model_path=str(handle.path), device=p.device, precision=p.precision,
                          prompts=prompts, cfg=p.sampling, eos_id=tok.eos_token_id,
                          pad_id=tok.pad_token_id, greedy=False, progress=False,
                          desc=f"curve {method} {step}")
        completions, logps = infer(job, p.num_processes, p.backend, handle.load)
        for prompt, comps, lps in zip(prompts, completions, logps, strict=True):
            rows += [(method, step, prompt, c, lp) for c, lp in zip(comps, lps, strict=True)]
    table = pd.DataFrame(rows, columns=["method", "step", "prompt_ids", "completion_ids", "logp"])
    comp = table["completion_ids"].map(list).tolist()
    prompt_ids = table["prompt_ids"].map(list).tolist()
    judge = make_gold_judge(p.gold_judge, p.gold_judge_args, gold_judge_model.name_or_path)
    texts = [t.strip() for t in tok.batch_decode(comp, skip_special_tokens=True)]
    table["gold"] = judge(texts) if judge is not None else np.nan
    members = infer(RewardsJob(model_path=str(reward_model.path), device=p.device, precision=p.precision,
                               sequences=[a + b for a, b in zip(prompt_ids, comp, strict=True)],
                               response_starts=[len(a) for a in prompt_ids],
                               batch_size=p.batch_size), p.num_processes, p.backend,
        lambda: reward_model.load(device=p.device))
    table["rm"] = ensemble_reward(members)[0]
    table["kl"] = table["logp"] - _completion_logps(reference_model, prompt_ids, comp, p)
    table.loc[table["method"] == "reference", "kl"] = 0.0  # its own log-probs: exactly 0
    curves = (table.groupby(["method", "step"], sort=False)
              .agg(gold=("gold", "mean"), rm=("rm", "mean"), kl=("kl", "mean"),
                   samples=("gold", "size")).reset_index())
    reference = curves[curves["method"] == "reference"]
    curves = pd.concat([reference.assign(method=m) for m in steps]
                       + [curves[curves["method"] != "reference"]], ignore_index=True)
    curves = curves.sort_values(["method", "step"], kind="stable").reset_index(drop=True)
    curves["sqrt_kl"] = np.sqrt(curves["kl"].clip(lower=0))
    payload: dict[str, float] = {}
    if judge is not None:
        kl, gold = gold_at_matched_kl(curves)
        payload = {"curve.matched_kl": kl} | {f"curve.{m}.gold_at_matched_kl": g for m, g in gold.items()}
    log.info("over-optimisation curves: %d points x %d samples in %.1f s", len(runs),
             len(prompts) * p.sampling.n_samples, time.perf_counter() - t0)
    return curves[["method", "step", "gold", "rm", "kl", "sqrt_kl", "samples"]], scalars(payload)


def summarize_evaluation(samples: pd.DataFrame, accuracy: dict[str, float], params: dict[str, Any]
                         ) -> tuple[pd.DataFrame, pd.DataFrame, MetricsPayload]:
    """Per-policy metrics (``evaluation.<policy>.<metric>`` in MLflow) and the samples table."""
    metrics = policy_metrics(samples, REFERENCE)
    metrics = metrics.sort_values("policy", key=lambda p: p != REFERENCE, kind="stable")
    metrics["preference_accuracy"] = metrics["policy"].map(accuracy)
    metrics = metrics[["policy", *METRICS, "samples"]]
    payload: dict[str, float] = {}
    for row in metrics.itertuples(index=False):
        for m in METRICS:
            value = getattr(row, m)
            if pd.notna(value):  # no gold judge: no gold metrics
                payload[f"{row.policy}.{m}"] = value
    # the precision sampling and scoring ran in (resolved as jobs.autocast resolves it)
    p = EvaluationParams.parse(params)
    payload["precision_bits"] = PRECISION_BITS[resolve_precision(p.precision, resolve_device(p.device))]
    for row in metrics.itertuples(index=False):
        log.info("evaluation %s: %s", row.policy,
                 ", ".join(f"{m} {getattr(row, m):.3f}" for m in METRICS))
    return metrics, reporting.samples_table(samples), scalars(payload)


def report_evaluation(metrics: pd.DataFrame, samples: pd.DataFrame, params: dict[str, Any],
                      **training_histories: MetricsPayload) -> tuple[Any, Any, Any, str]:
    """PNG figures (training curves of every policy and of the reward model, gold reward vs KL,
    win rates) and the Markdown summary."""
    return (reporting.training_curves(training_histories), reporting.reward_vs_kl(samples, metrics),
            reporting.win_rates(metrics),
            reporting.markdown_summary(metrics, samples, EvaluationParams.parse(params)))


def report_curves(curves: pd.DataFrame) -> Any:
    """The over-optimisation plot (``reporting.overoptimization``)."""
    return reporting.overoptimization(curves)


def package_policy(policy: PretrainedHandle, tokenizer: PretrainedHandle, metrics: pd.DataFrame,
                   groups: pd.DataFrame, data_params: dict[str, Any], params: dict[str, Any], *,
                   name: str) -> ModelBundle:
    """Policy ``name`` as an MLflow Model (``rpo_pipeline.mlflow_models``): its weights and
    tokenizer, the prompt template, the evaluation's sampling settings and an input example from
    the data; its registered version is tagged with its evaluation metrics."""
    p = EvaluationParams.parse(params)
    row = metrics.set_index("policy").loc[name]
    tags = {f"evaluation.{m}": f"{row[m]:.6g}" for m in METRICS if pd.notna(row[m])}
    return ModelBundle(POLICY, {"policy": str(policy.path), "tokenizer": str(tokenizer.path)},
                       {"text_format": text_format(DataProcessingParams.parse(data_params)),
                        "sampling": p.sampling.model_dump(), "device": p.device,
                        **data_example(groups)},
                       tags | {"method": name, "evaluation.split": p.split})
