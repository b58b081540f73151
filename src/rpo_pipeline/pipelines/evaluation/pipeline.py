"""evaluation pipeline wiring (namespace ``evaluation``)."""

from collections.abc import Sequence
from functools import partial, update_wrapper

from kedro.pipeline import Node, Pipeline

from rpo_pipeline.params import POLICY_METHODS

from .nodes import (
    package_policy,
    pair_accuracy,
    report_evaluation,
    sample_policy,
    score_samples,
    summarize_evaluation,
)

SHARED = ["tokenizer", "tokenized_prompts", "tokenized_examples", "preference_groups", "preference_pairs", "sft_model",
          "reward_model", "reward_model.training_history"]


def create_pipeline(policies: Sequence[str] = POLICY_METHODS, **kwargs) -> Pipeline:
    """Sample the reference (π_SFT) and each ``<policy>.policy_model``; score, compare, report."""
    # inside the template a policy model is ``<p>_policy_model``, mapped to ``<p>.policy_model``
    # (likewise ``<p>_training_history``)
    policy_models = {p: f"{p}_policy_model" for p in policies}
    histories = {p: f"{p}_training_history" for p in policies}
    models = {"reference": "sft_model"} | policy_models
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
                     "params": "params:evaluation"} | {n: f"samples_{n}" for n in models},
             outputs="scored_samples", name="score_samples"),
        Node(pair_accuracy,
             inputs={"reference_model": "sft_model", "tokenizer": "tokenizer",
                     "tokenized": "tokenized_examples", "pairs": "preference_pairs",
                     "params": "params:evaluation"} | policy_models,
             outputs="pair_accuracy", name="pair_accuracy"),
        Node(summarize_evaluation, inputs=["scored_samples", "pair_accuracy", "params:evaluation"],
             outputs=["policy_metrics", "samples_table", "metrics"], name="summarize_evaluation"),
        Node(report_evaluation,
             inputs={"metrics": "policy_metrics", "samples": "scored_samples",
                     "params": "params:evaluation"} | histories
             | {"reward_model": "reward_model.training_history"},
             outputs=["training_curves_plot", "reward_vs_kl_plot", "win_rates_plot", "summary"],
             name="report_evaluation"),
        *[Node(update_wrapper(partial(package_policy, name=p), package_policy),
               inputs=[model, "tokenizer", "policy_metrics", "params:data_processing",
                       "params:evaluation"],
               outputs=f"{p}_mlflow_model", name=f"package_{p}")
          for p, model in policy_models.items()],
    ])
    return Pipeline(template, namespace="evaluation",
                    inputs={**{s: s for s in SHARED},
                            **{f"{p}_policy_model": f"{p}.policy_model" for p in policies},
                            **{f"{p}_training_history": f"{p}.training_history" for p in policies}},
                    outputs={f"{p}_mlflow_model": f"{p}.mlflow_model" for p in policies},
                    parameters={"params:evaluation", "params:data_processing"})
