"""Generation evaluation: sample from π_ref and the trained policies, judge, compare.

Kedro-free. For every held-out prompt each policy draws N completions with the same seeded sampling
settings (and one greedy completion for the samples table). Completions are scored by a gold judge
(VADER positivity on the default task), the reward model, and by their log-probability under the
policy and under π_ref, which gives the sequence-level KL estimate

    KL(π ‖ π_ref)(x) ≈ mean over y ~ π(·|x) of [log π(y|x) − log π_ref(y|x)]   (summed over tokens).

The estimate is unbiased only for plain sampling (temperature 1, top-p 1, no top-k), the default.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from rpo_pipeline.batching import collate
from rpo_pipeline.params import GOLD_JUDGES, GoldJudgeArgs, SamplingConfig
from rpo_pipeline.reference import response_logps
from rpo_pipeline.training import local_device, resolve_device, world

Judge = Callable[[list[str]], np.ndarray]


def curve_steps(steps: int, points: int) -> list[int]:
    """The steps of the intermediate policies of an over-optimisation curve: ``points`` evenly
    spaced points of a ``steps``-step run, the last being the trained policy (not listed)."""
    return sorted({round(k * steps / points) for k in range(1, points)} - {0, steps})


def eval_prompts(prompts: pd.DataFrame, split: str = "test", max_prompts: int | None = None
                 ) -> pd.DataFrame:
    """One row per group of ``split`` (``tokenized_prompts``), by group_id: group_id, prompt_ids."""
    rows = prompts[prompts["split"] == split].sort_values("group_id", kind="stable")
    if max_prompts is not None:
        rows = rows.head(max_prompts)
    return pd.DataFrame({"group_id": rows["group_id"].to_numpy(),
                         "prompt_ids": [list(p) for p in rows["prompt_ids"]]})


def _trim(tokens: Sequence[int], eos_id: int) -> list[int]:
    """Generated tokens up to and including the first EOS (padding after it dropped)."""
    out = []
    for t in tokens:
        out.append(int(t))
        if t == eos_id:
            break
    return out


@torch.inference_mode()
def generate(model: torch.nn.Module, prompts: Sequence[Sequence[int]], cfg: SamplingConfig,
             eos_id: int, pad_id: int, greedy: bool = False, device: str = "auto",
             progress: bool = True, desc: str = "generate"
             ) -> tuple[list[list[list[int]]], list[list[float]]]:
    """Completions (token ids, EOS included when produced) per prompt, N sampled or 1 greedy, and
    their log-probabilities log π(y|x) under the model (from the raw logits, before any warping).

    Prompts are left-padded in length-sorted batches; batch b is sampled after
    ``torch.manual_seed(cfg.seed + b)``, so two policies given the same prompts draw with the same
    random stream. In a process group each rank samples every N-th batch, with that batch's seed
    (empty lists elsewhere): the samples do not depend on the number of processes.
    """
    rank, size = world()
    dev = local_device(device)
    model.to(dev).eval()
    n = 1 if greedy else cfg.n_samples
    order = np.argsort([-len(p) for p in prompts], kind="stable")
    out: list[list[list[int]]] = [[] for _ in prompts]
    logps: list[list[float]] = [[] for _ in prompts]
    mine = list(enumerate(range(0, len(order), cfg.batch_size)))[rank::size]
    for b, i in tqdm(mine, desc=desc, disable=not progress or rank > 0, dynamic_ncols=True):
        idx = order[i:i + cfg.batch_size]
        batch = collate([prompts[j] for j in idx], [0] * len(idx), pad_id, padding_side="left")
        torch.manual_seed(cfg.seed + b)
        kwargs = ({"do_sample": False} if greedy else
                  {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p,
                   "top_k": cfg.top_k, "num_return_sequences": n})
        seqs = model.generate(input_ids=batch["input_ids"].to(dev),
                              attention_mask=batch["attention_mask"].to(dev),
                              max_new_tokens=cfg.max_new_tokens, pad_token_id=pad_id,
                              eos_token_id=eos_id, output_logits=True,
                              return_dict_in_generate=True, **kwargs)
        new = seqs.sequences[:, batch["input_ids"].shape[1]:]
        # log-prob of each generated token under the untempered model; zero after the first EOS
        logits = torch.stack(seqs.logits, 1).float()
        tok_lp = torch.log_softmax(logits, -1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
        after_eos = (new == eos_id).long().cumsum(-1) - (new == eos_id).long() > 0
        seq_lp = tok_lp.masked_fill(after_eos, 0.0).double().sum(-1).cpu().tolist()
        new = new.cpu().tolist()
        for k, j in enumerate(idx):
            out[j] = [_trim(new[k * n + s], eos_id) for s in range(n)]
            logps[j] = [seq_lp[k * n + s] for s in range(n)]
    return out, logps


@torch.inference_mode()
def completion_logps(model: torch.nn.Module, prompts: Sequence[Sequence[int]],
                      completions: Sequence[Sequence[int]], batch_size: int = 64,
                      device: str = "auto", progress: bool = False) -> np.ndarray:
    """log π(y|x) summed over the completion tokens, for each (prompt, completion)."""
    seqs = [list(p) + list(c) for p, c in zip(prompts, completions, strict=True)]
    logp, _ = response_logps(model, seqs, [len(p) for p in prompts], batch_size, device,
                              progress=progress)
    return logp


# ---- gold judges ----------------------------------------------------------------------------

def vader_positivity(texts: Sequence[str]) -> np.ndarray:
    """(compound + 1) / 2 of VADER on each text: 0 = most negative, 1 = most positive."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer  # only the VADER judge needs it

    sia = SentimentIntensityAnalyzer()
    return np.array([(sia.polarity_scores(t)["compound"] + 1) / 2 for t in texts])


def hf_classifier_positivity(model: str, *, batch_size: int, device: str, positive_label: str
                             ) -> Judge:
    """P(positive) from a sentiment classifier (a local path or a Hub id, e.g. the DPO paper's
    ``siebert/sentiment-roberta-large-english``)."""
    from transformers import pipeline  # only the hf_classifier judge needs it

    dev = resolve_device(device)
    clf = pipeline("text-classification", model=model, device=dev, top_k=None)
    labels = {v.upper(): k for k, v in clf.model.config.id2label.items()}
    if positive_label.upper() not in labels:
        raise ValueError(f"{model}: no {positive_label!r} label among "
                         f"{sorted(clf.model.config.id2label.values())}; set "
                         "evaluation.gold_judge_args.positive_label")

    def judge(texts: list[str]) -> np.ndarray:
        scores = clf(list(texts), batch_size=batch_size, truncation=True)
        return np.array([next(s["score"] for s in row if s["label"].upper() == positive_label.upper())
                         for row in scores])
    return judge


def make_gold_judge(name: str, args: GoldJudgeArgs, model: str | None = None) -> Judge | None:
    """The configured gold judge (None for ``none``); ``args`` are used by ``hf_classifier``, whose
    classifier is read from ``model`` (``args.model`` as the run resolved it, the catalog's
    ``gold_judge_model``), by default ``args.model`` itself."""
    if name == "vader":
        return vader_positivity
    if name == "none":
        return None
    if name == "hf_classifier":
        if args.model is None:
            raise ValueError("evaluation.gold_judge hf_classifier needs gold_judge_args.model "
                             "(a local path or Hub id of a sentiment classifier)")
        return hf_classifier_positivity(model or args.model, batch_size=args.batch_size, device=args.device,
                                        positive_label=args.positive_label)
    raise ValueError(f"evaluation.gold_judge must be one of {list(GOLD_JUDGES)}, got {name!r}")


# ---- metrics --------------------------------------------------------------------------------

def win_rate(policy: np.ndarray, reference: np.ndarray) -> float:
    """P(policy sample beats a reference sample of the same prompt), ties counting half.

    ``policy`` and ``reference`` are (prompts, samples) score arrays; every policy sample is
    compared with every reference sample of its prompt.
    """
    p, r = np.asarray(policy, float)[:, :, None], np.asarray(reference, float)[:, None, :]
    return float(((p > r) + 0.5 * (p == r)).mean())


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Distinct n-grams / all n-grams of lower-cased whitespace words, over all texts."""
    grams: list[tuple[str, ...]] = []
    for t in texts:
        w = t.lower().split()
        grams += [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def preference_accuracy(margins: np.ndarray) -> float:
    """Share of pairs whose implicit reward margin favours the chosen response (ties half)."""
    m = np.asarray(margins, float)
    return float(((m > 0) + 0.5 * (m == 0)).mean()) if len(m) else float("nan")


def rank_correlation(scores: Sequence[float], gold: Sequence[float]) -> float:
    """Spearman's ρ of two score arrays (Pearson's r of their ranks, ties sharing the average rank);
    NaN when either is constant."""
    a = pd.Series(scores, dtype=float).rank().to_numpy()
    b = pd.Series(gold, dtype=float).rank().to_numpy()
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def pair_agreement(groups: Sequence[Sequence[float]], gold: Sequence[Sequence[float]]) -> float:
    """Over the pairs of samples of one prompt whose gold differs, the share that ``groups``'
    scores order like gold (a tie in score counts half); NaN when no pair differs in gold.

    ``groups[p]`` and ``gold[p]`` are the scores of prompt p's samples (any number per prompt).
    """
    hits, pairs = 0.0, 0
    for s, y in zip(groups, gold, strict=True):
        s, y = np.asarray(s, float), np.asarray(y, float)
        i, j = np.triu_indices(len(s), 1)
        differ = y[i] != y[j]
        agree = (np.sign(s[i] - s[j]) * np.sign(y[i] - y[j]))[differ]
        hits += float((agree > 0).sum() + 0.5 * (agree == 0).sum())
        pairs += int(differ.sum())
    return hits / pairs if pairs else float("nan")


def rm_gold_agreement(samples: pd.DataFrame, score: str = "rm", gold: str = "gold") -> dict[str, float]:
    """How well ``score`` ranks these samples against ``gold``: ``rm_gold_spearman``
    (``rank_correlation``) and ``rm_gold_pair_accuracy`` (``pair_agreement`` within each
    ``group_id``); NaN where a sample has no gold score."""
    if not samples[gold].notna().all():
        return {"rm_gold_spearman": float("nan"), "rm_gold_pair_accuracy": float("nan")}
    by_prompt = samples.groupby("group_id")
    return {"rm_gold_spearman": rank_correlation(samples[score], samples[gold]),
            "rm_gold_pair_accuracy": pair_agreement([g[score] for _, g in by_prompt],
                                                    [g[gold] for _, g in by_prompt])}


def policy_metrics(samples: pd.DataFrame, reference: str = "reference") -> pd.DataFrame:
    """Per policy: the evaluation metrics over its sampled completions.

    ``samples`` has one row per sampled completion: policy, group_id, sample, completion, tokens,
    gold (NaN without a gold judge), rm, logp, ref_logp. ``rm_gold_spearman`` and
    ``rm_gold_pair_accuracy`` say how well the reward model ranks this policy's own samples
    (``rm_gold_agreement``): where they fall below the reward model's accuracy on
    its training data, the policy is being optimised against the proxy's errors.
    """
    s = samples[samples["sample"] >= 0].sort_values(["policy", "group_id", "sample"], kind="stable")

    def grid(policy: str, col: str) -> np.ndarray:
        part = s[s["policy"] == policy]
        return part[col].to_numpy(float).reshape(part["group_id"].nunique(), -1)

    rows = []
    for policy, part in s.groupby("policy", sort=False):
        has_gold = part["gold"].notna().all()
        rows.append({
            "policy": policy,
            "gold_reward_mean": part["gold"].mean() if has_gold else float("nan"),
            "rm_score_mean": part["rm"].mean(),
            "kl_to_reference": (part["logp"] - part["ref_logp"]).mean(),
            "win_rate_gold": (win_rate(grid(policy, "gold"), grid(reference, "gold"))
                              if has_gold else float("nan")),
            "win_rate_rm": win_rate(grid(policy, "rm"), grid(reference, "rm")),
            **rm_gold_agreement(part),
            "length_mean": part["tokens"].mean(),
            "distinct_2": distinct_n(part["completion"].tolist(), 2),
            "samples": len(part),
        })
    return pd.DataFrame(rows)


def gold_at_matched_kl(curves: pd.DataFrame, value: str = "gold") -> tuple[float, dict[str, float]]:
    """Each method's ``value`` interpolated (linearly in KL, along its curve in step order) at the
    largest KL every method reaches: methods compared at matched KL, not at their end points.

    ``curves`` has method, step, kl and ``value`` (``score_curves``' table, the reference at step
    0 of each method). Returns the matched KL and the value per method (NaN where a curve's KL
    does not increase along training).
    """
    parts = {m: c.sort_values("step") for m, c in curves.groupby("method", sort=True)}
    kl = float(min(c["kl"].max() for c in parts.values()))
    out = {}
    for m, c in parts.items():
        x, y = c["kl"].to_numpy(), c[value].to_numpy()
        hi = int(np.argmax(x >= kl))  # the first point at or beyond the matched KL
        if hi == 0:
            out[m] = float(y[0])
        else:
            lo = hi - 1
            out[m] = float(y[lo] + (y[hi] - y[lo]) * (kl - x[lo]) / (x[hi] - x[lo])) if x[hi] > x[lo] else float("nan")
    return kl, out
