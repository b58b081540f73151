"""evaluation pipeline wiring (namespace ``evaluation``)."""

from collections.abc import Sequence
from functools import partial, update_wrapper

from kedro.pipeline import Node, Pipeline

from rpo_pipeline.params import POLICY_METHODS

from .nodes import (
    package_policy,
    pair_accuracy,
    report_curves,
    report_evaluation,
    sample_policy,
    score_curves,
    score_samples,
    summarize_evaluation,
)

SHARED = ["tokenizer", "tokenized_prompts", "tokenized_examples", "preference_groups", "preference_pairs", "sft_model",
          "reward_model", "reward_model.training_history", "gold_judge_model"]


def _curve_points(policies: Sequence[str], rounds: int) -> dict[str, tuple[str, str]]:
    """``score_curves``' inputs, as (name in the template, name outside): each method's steps, and
    its intermediate and trained policies (rpo_online: its rounds' policies)."""
    points: dict[str, tuple[str, str]] = {}
    for p in policies:
        points[f"{p}__steps"] = (f"params:{p}.train.steps",) * 2
        if p == "rpo_online":
            points |= {f"{p}__round_{r}": (f"{p}_round_{r}_policy_model", f"{p}.round_{r}.policy_model")
                       for r in range(1, rounds)}
            points[f"{p}__round_{rounds}"] = (f"{p}_policy_model", f"{p}.policy_model")
        else:
            points |= {f"{p}__curve": (f"{p}_curve_policies", f"{p}.curve_policies"),
                       f"{p}__final": (f"{p}_policy_model", f"{p}.policy_model")}
    return points


def create_pipeline(policies: Sequence[str] = POLICY_METHODS, rounds: int = 1, **kwargs) -> Pipeline:
    """Sample the reference (π_SFT) and each ``<policy>.policy_model``; score, compare, report;
    the over-optimisation curves along each method's training (``rounds``: rpo_online's)."""
    # inside the template a policy model is ``<p>_policy_model``, mapped to ``<p>.policy_model``
    # (likewise ``<p>_training_history``)
    policy_models = {p: f"{p}_policy_model" for p in policies}
    histories = {p: f"{p}_training_history" for p in policies}
    models = {"reference": "sft_model"} | policy_models
    points = _curve_points(policies, rounds)
    curve_points = {k: inner for k, (inner, _) in points.items()}
    curve_inputs = {inner: outer for inner, outer in points.values()
                    if not inner.startswith("params:") and inner not in policy_models.values()}
    curve_params = {inner for inner, _ in points.values() if inner.startswith("params:")}
    sampling = [
        Node(sample_policy, inputs=[model, "tokenizer", "tokenized_prompts", "params:evaluation"],
             outputs=f"samples_{name}", name=f"sample_{name}")
        for name, model in models.items()
    ]
    template = Pipeline([
        *sampling,
        Node(score_samples,
             inputs={"reference_model": "sft_model", "reward_model": "reward_model",
                     "tokenizer": "tokenizer", "groups": "preference_groups",
                     "gold_judge_model": "gold_judge_model",
                     "params": "params:evaluation"} | {n: f"samples_{n}" for n in models},
             outputs="scored_samples", name="score_samples"),
        Node(pair_accuracy,
             inputs={"reference_model": "sft_model", "tokenizer": "tokenizer",
                     "tokenized": "tokenized_examples", "pairs": "preference_pairs",
                     "params": "params:evaluation"} | policy_models,
             outputs="pair_accuracy", name="pair_accuracy"),
        Node(summarize_evaluation, inputs=["scored_samples", "pair_accuracy", "params:evaluation"],
             outputs=["policy_metrics", "samples_table", "metrics"], name="summarize_evaluation"),
        Node(score_curves,
             inputs={"reference_model": "sft_model", "reward_model": "reward_model",
                     "tokenizer": "tokenizer", "tokenized_prompts": "tokenized_prompts",
                     "gold_judge_model": "gold_judge_model",
                     "params": "params:evaluation"} | curve_points,
             outputs=["curves", "curve_metrics"], name="score_curves"),
        Node(report_curves, inputs="curves", outputs="overoptimization_plot", name="report_curves"),
        Node(report_evaluation,
             inputs={"metrics": "policy_metrics", "samples": "scored_samples",
                     "params": "params:evaluation"} | histories
             | {"reward_model": "reward_model.training_history"},
             outputs=["training_curves_plot", "reward_vs_kl_plot", "win_rates_plot", "summary"],
             name="report_evaluation"),
        *[Node(update_wrapper(partial(package_policy, name=p), package_policy),
               inputs=[model, "tokenizer", "policy_metrics", "preference_groups",
                       "params:data_processing", "params:evaluation"],
               outputs=f"{p}_mlflow_model", name=f"package_{p}")
          for p, model in policy_models.items()],
    ])
    return Pipeline(template, namespace="evaluation",
                    inputs={**{s: s for s in SHARED}, **curve_inputs,
                            **{f"{p}_policy_model": f"{p}.policy_model" for p in policies},
                            **{f"{p}_training_history": f"{p}.training_history" for p in policies}},
                    outputs={f"{p}_mlflow_model": f"{p}.mlflow_model" for p in policies},
                    parameters={"params:evaluation", "params:data_processing", *curve_params})
