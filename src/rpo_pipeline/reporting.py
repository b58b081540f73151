"""Evaluation reports: the samples table, matplotlib figures and the Markdown summary.

Kedro-free. Figures are built with the object-oriented API (``matplotlib.figure.Figure``, no pyplot
state), so they render headless and are saved by whichever dataset receives them.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from rpo_pipeline.params import EvaluationParams

COLORS = {"reference": "#7f7f7f", "dpo": "#1f77b4", "rpo": "#d62728", "rpo_online": "#9467bd",
          "reward_model": "#2ca02c"}
METRIC_LABELS = {
    "gold_reward_mean": "gold reward (mean)", "rm_score_mean": "reward-model score (mean)",
    "kl_to_reference": "KL to reference (nats)", "win_rate_gold": "win rate vs ref (gold)",
    "win_rate_rm": "win rate vs ref (RM)", "preference_accuracy": "test-pair accuracy",
    "length_mean": "length (tokens)", "distinct_2": "distinct-2",
    "rm_gold_spearman": "RM-gold Spearman", "rm_gold_pair_accuracy": "RM-gold pair accuracy",
}


def _color(name: str, i: int) -> str:
    return COLORS.get(name, f"C{i + 3}")


def samples_table(samples: pd.DataFrame) -> pd.DataFrame:
    """One row per prompt: each policy's greedy completion with its gold and RM scores, and the
    mean gold / RM score of its sampled completions."""
    greedy = samples[samples["sample"] < 0]
    sampled = samples[samples["sample"] >= 0]
    out = greedy.drop_duplicates("group_id")[["group_id", "prompt"]].set_index("group_id")
    for policy in samples["policy"].unique():
        g = greedy[greedy["policy"] == policy].set_index("group_id")
        s = sampled[sampled["policy"] == policy].groupby("group_id")
        out[policy] = g["completion"]
        out[f"{policy}_gold"] = g["gold"]
        out[f"{policy}_rm"] = g["rm"]
        out[f"{policy}_samples_gold_mean"] = s["gold"].mean()
        out[f"{policy}_samples_rm_mean"] = s["rm"].mean()
    return out.reset_index()


def _series(history: Mapping[str, list[dict[str, float]]], key: str) -> tuple[list, list]:
    points = history.get(key) or []
    return [p["step"] for p in points], [p["value"] for p in points]


def training_curves(histories: Mapping[str, Mapping[str, list[dict[str, float]]]]) -> Figure:
    """Loss and reward accuracy against optimizer step for dpo, rpo and the reward model.

    Solid lines: training (averaged over each logging window); markers: evaluation on val.
    """
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    for i, (name, hist) in enumerate(histories.items()):
        if not hist:
            continue
        c = _color(name, i)
        x, y = _series(hist, "loss")
        ax_loss.plot(x, y, color=c, label=f"{name} train")
        x, y = _series(hist, "eval_loss")
        if x:
            ax_loss.plot(x, y, "o--", color=c, label=f"{name} val")
        acc_key = "accuracy" if name == "reward_model" else "rewards/accuracies"
        x, y = _series(hist, acc_key)
        ax_acc.plot(x, y, color=c, label=f"{name} train")
        x, y = _series(hist, f"eval_{acc_key}")
        if x:
            ax_acc.plot(x, y, "o--", color=c, label=f"{name} val")
        x, y = _series(hist, "val_accuracy")  # the reward model's held-out accuracy at the end
        if y:
            ax_acc.plot([max(_series(hist, "loss")[0] or [0])], y, "s", color=c, ms=8,
                        label=f"{name} val")
    ax_loss.set(title="Training loss (as optimised, incl. any SFT term)", xlabel="optimizer step",
                ylabel="loss", yscale="log")
    ax_acc.set(title="Reward accuracy (chosen ranked above rejected)", xlabel="optimizer step",
               ylabel="accuracy", ylim=(0.4, 1.02))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Training curves")
    return fig


def reward_vs_kl(samples: pd.DataFrame, metrics: pd.DataFrame) -> Figure:
    """Gold reward against sequence KL to the reference, one point per policy (DPO paper, Fig. 2
    style; the reward-model score when there is no gold judge). Error bars: ±1 standard error of
    the per-prompt means."""
    fig = Figure(figsize=(6.4, 4.6), layout="constrained")
    ax = fig.subplots()
    y_col = "gold_reward_mean" if metrics["gold_reward_mean"].notna().all() else "rm_score_mean"
    s_col = "gold" if y_col == "gold_reward_mean" else "rm"
    sampled = samples[samples["sample"] >= 0]
    for i, row in enumerate(metrics.itertuples(index=False)):
        part = sampled[sampled["policy"] == row.policy]
        per_prompt = part.groupby("group_id")
        y_err = per_prompt[s_col].mean().std(ddof=1) / np.sqrt(per_prompt.ngroups)
        x_err = per_prompt["kl"].mean().std(ddof=1) / np.sqrt(per_prompt.ngroups)
        c = _color(row.policy, i)
        ax.errorbar(row.kl_to_reference, getattr(row, y_col), xerr=x_err, yerr=y_err, fmt="o",
                    color=c, ms=8, capsize=3, label=f"{row.policy}")
    ax.set(title=f"{METRIC_LABELS[y_col].split(' (')[0].capitalize()} vs KL to the reference",
           xlabel="sequence KL(π ‖ π_ref), nats (mean over samples)", ylabel=METRIC_LABELS[y_col])
    ax.grid(alpha=0.3)
    ax.legend(title="policy")
    return fig


def overoptimization(curves: pd.DataFrame) -> Figure:
    """Gold reward (left) and reward-model score (right) against √KL to the reference along each
    method's training (Gao et al., arXiv 2210.10760, Fig. 1): where the proxy keeps rising and
    gold flattens or falls, the policy is over-optimising the reward model. The left panel is each
    method's reward–KL frontier on its checkpoints."""
    fig = Figure(figsize=(10.5, 4.4), layout="constrained")
    axes = fig.subplots(1, 2, sharex=True)
    has_gold = curves["gold"].notna().all()
    for i, (method, c) in enumerate(curves.groupby("method", sort=False)):
        c = c.sort_values("step")
        for ax, col in zip(axes, ("gold", "rm"), strict=True):
            if col == "gold" and not has_gold:
                continue
            ax.plot(c["sqrt_kl"], c[col], "o-", color=_color(method, i), label=method)
            for x, y, step in zip(c["sqrt_kl"], c[col], c["step"], strict=True):
                ax.annotate(str(step), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    axes[0].set(title="Gold reward along training", xlabel="√KL(π ‖ π_ref), √nats",
                ylabel="gold reward (mean)")
    axes[1].set(title="Proxy (reward model) along training", xlabel="√KL(π ‖ π_ref), √nats",
                ylabel="reward-model score (mean)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(title="method (labels: step)", fontsize=8)
    return fig


def win_rates(metrics: pd.DataFrame) -> Figure:
    """Win rate of each policy against the reference, by the gold judge and the reward model."""
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(metrics))
    judges = [("win_rate_gold", "gold judge", "#ff7f0e"), ("win_rate_rm", "reward model", "#9467bd")]
    judges = [j for j in judges if metrics[j[0]].notna().all()]
    width = 0.8 / max(len(judges), 1)
    for k, (col, label, color) in enumerate(judges):
        bars = ax.bar(x + (k - (len(judges) - 1) / 2) * width, metrics[col], width, label=label,
                      color=color)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.axhline(0.5, color="k", ls="--", lw=1, label="tie with reference")
    ax.set_xticks(x, metrics["policy"])
    ax.set(title="Win rate against the reference (same prompts, ties half)", xlabel="policy",
           ylabel="win rate", ylim=(0, 1.22))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", ncol=3)
    return fig


def markdown_summary(metrics: pd.DataFrame, samples: pd.DataFrame, params: EvaluationParams
                     ) -> str:
    """A short report: settings, the metrics table, deltas to the reference, example completions."""
    s = params.sampling
    n_prompts = samples["group_id"].nunique()
    lines = [
        "# Evaluation summary", "",
        f"{n_prompts} held-out `{params.split}` prompts, {s.n_samples} samples each per "
        f"policy (temperature {s.temperature}, top-p {s.top_p}, top-k {s.top_k}, at most "
        f"{s.max_new_tokens} new tokens, seed {s.seed}) plus one greedy completion. Gold "
        f"judge: `{params.gold_judge}`. KL: mean over the policy's own samples of "
        "log π(y|x) − log π_ref(y|x), in nats. Win rates: every sample against every reference "
        "sample of the same prompt, ties half. RM-gold Spearman / pair accuracy: how well the reward "
        "model ranks the policy's own samples (pairs of one prompt whose gold differs).", "",
        "| policy | " + " | ".join(METRIC_LABELS[m] for m in METRIC_LABELS) + " |",
        "|---|" + "---:|" * len(METRIC_LABELS),
    ]
    for row in metrics.itertuples(index=False):
        lines.append(f"| {row.policy} | " + " | ".join(
            f"{getattr(row, m):.3f}" for m in METRIC_LABELS) + " |")
    ref = metrics.set_index("policy").loc["reference"]
    others = metrics[metrics["policy"] != "reference"]
    if len(others):
        lines += ["", "Against the reference:", ""]
        for row in others.itertuples(index=False):
            lines.append(
                f"- **{row.policy}**: gold reward {row.gold_reward_mean - ref.gold_reward_mean:+.3f}, "
                f"RM score {row.rm_score_mean - ref.rm_score_mean:+.3f}, win rate "
                f"{row.win_rate_gold:.3f} (gold) / {row.win_rate_rm:.3f} (RM) at KL "
                f"{row.kl_to_reference:.2f} nats")
    greedy = samples[samples["sample"] < 0]
    lines += ["", "Greedy completions of the first prompts:", ""]
    for gid in sorted(greedy["group_id"].unique())[:3]:
        g = greedy[greedy["group_id"] == gid]
        lines.append(f"- *{g['prompt'].iloc[0]}*")
        for row in g.itertuples(index=False):
            lines.append(f"  - {row.policy} (gold {row.gold:.2f}): {row.completion}")
    lines += ["", "Figures: `training_curves.png`, `reward_vs_kl.png`, `win_rates.png`.", ""]
    return "\n".join(lines)


# ---- reward-KL frontiers (scripts/sweep.py) ------------------------------------------------------
def frontier(points: pd.DataFrame) -> pd.DataFrame:
    """Per method, its points sorted by KL (``method``, ``kl``, ``gold``, ...)."""
    return points.sort_values(["method", "kl"], kind="stable").reset_index(drop=True)


def gold_at_kl(points: pd.DataFrame, kl: np.ndarray) -> pd.DataFrame:
    """Each method's gold reward linearly interpolated at the KLs ``kl`` (NaN outside the KL range
    its points span: no extrapolation). One column per method, indexed by KL."""
    out = {}
    for method, part in frontier(points).groupby("method", sort=False):
        x, y = part["kl"].to_numpy(float), part["gold"].to_numpy(float)
        out[method] = np.interp(kl, x, y, left=np.nan, right=np.nan)
    return pd.DataFrame(out, index=pd.Index(kl, name="kl"))


def matched_kl(points: pd.DataFrame, n: int = 5) -> pd.DataFrame:
    """Every pair of methods compared at matched KL: ``n`` KLs evenly spaced over the KL range both
    methods' points span, each method's gold reward interpolated there (``gold_at_kl``). One row
    per pair and KL: method_a, method_b, kl, gold_a, gold_b, a_minus_b; a pair whose ranges do not
    overlap gets one row with kl NaN (they cannot be compared without extrapolating)."""
    spans = points.groupby("method")["kl"].agg(["min", "max"])
    methods = list(dict.fromkeys(points["method"]))
    rows = []
    for i, a in enumerate(methods):
        for b in methods[i + 1:]:
            lo, hi = max(spans.loc[a, "min"], spans.loc[b, "min"]), min(spans.loc[a, "max"],
                                                                         spans.loc[b, "max"])
            kls = np.linspace(lo, hi, n) if lo < hi else np.array([np.nan])
            gold = gold_at_kl(points[points["method"].isin([a, b])], kls)
            for kl, ga, gb in zip(kls, gold[a], gold[b], strict=True):
                rows.append({"method_a": a, "method_b": b, "kl": kl, "gold_a": ga, "gold_b": gb,
                             "a_minus_b": ga - gb})
    return pd.DataFrame(rows, columns=["method_a", "method_b", "kl", "gold_a", "gold_b",
                                       "a_minus_b"])


def frontier_plot(points: pd.DataFrame, reference_gold: float | None = None,
                  title: str = "gold reward vs KL") -> Figure:
    """Gold reward against KL(π‖π_ref), one line per method through its sweep points (labelled by
    β), in the style of the DPO paper's Fig. 2; the reference at KL 0."""
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    for i, (method, part) in enumerate(frontier(points).groupby("method", sort=False)):
        ax.plot(part["kl"], part["gold"], "o-", color=_color(method, i), label=method)
        for row in part.itertuples(index=False):
            ax.annotate(f"β={row.beta:g}", (row.kl, row.gold), textcoords="offset points",
                        xytext=(4, -10), fontsize=7, color=_color(method, i))
    if reference_gold is not None:
        ax.plot([0], [reference_gold], "s", color=COLORS["reference"], label="reference (π_SFT)")
    ax.set_xlabel(METRIC_LABELS["kl_to_reference"])
    ax.set_ylabel(METRIC_LABELS["gold_reward_mean"])
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig
