"""rpo_online wiring: ``rounds`` namespaced instances of one round template.

Round r (namespace ``rpo_online.round_<r>``) reads ``previous_policy`` (π_SFT for round 1, else
``rpo_online.round_<r-1>.policy_model``) and writes ``policy_model``, ``training_history`` and
``train_metrics``; the last round's policy and history are ``rpo_online.policy_model`` and
``rpo_online.training_history``.
"""

from functools import partial, update_wrapper

from kedro.pipeline import Node, Pipeline

from .nodes import label_round, sample_round, train_round

SHARED = ["tokenizer", "tokenized_prompts", "reward_model", "sft_model", "reward_stats"]


def _for_round(fn, r: int):
    """``fn`` with ``round_index=r`` bound, keeping its name and docstring for kedro-viz."""
    return update_wrapper(partial(fn, round_index=r), fn)


def round_template(r: int) -> Pipeline:
    return Pipeline([
        Node(_for_round(sample_round, r),
             inputs=["previous_policy", "tokenizer", "tokenized_prompts", "params:rpo_online"],
             outputs="samples", name="sample_round"),
        Node(label_round,
             inputs=["samples", "reward_model", "sft_model", "tokenizer", "reward_stats",
                     "params:rpo_online", "params:evaluation"],
             outputs="labelled_samples", name="label_round"),
        Node(_for_round(train_round, r),
             inputs=["previous_policy", "tokenizer", "labelled_samples", "params:rpo_online"],
             outputs=["policy_model", "training_history", "train_metrics"], name="train_round"),
    ])


def create_pipeline(rounds: int = 2, **kwargs) -> Pipeline:
    """``rounds`` rounds chained policy to policy; ``rpo_online.policy_model`` is the last one's."""
    if rounds < 1:
        raise ValueError(f"rpo_online.rounds must be at least 1, got {rounds}")
    out = Pipeline([])
    for r in range(1, rounds + 1):
        previous = "sft_model" if r == 1 else f"rpo_online.round_{r - 1}.policy_model"
        outputs = ({"policy_model": "rpo_online.policy_model",
                    "training_history": "rpo_online.training_history"} if r == rounds else None)
        out += Pipeline(round_template(r), namespace=f"rpo_online.round_{r}",
                        inputs={"previous_policy": previous, **{s: s for s in SHARED}},
                        outputs=outputs, parameters={"params:rpo_online", "params:evaluation"})
    return out
