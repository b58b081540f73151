"""rpo_online wiring: ``rounds`` namespaced instances of one round template.

Round r (namespace ``rpo_online.round_<r>``) reads ``previous_policy`` (π_SFT for round 1, else
``rpo_online.round_<r-1>.policy_model``) and writes ``policy_model``, ``training_history`` and
``train_metrics``; the last round's policy and history are ``rpo_online.policy_model`` and
``rpo_online.training_history``. With an on-policy refresh (``refresh.labels_per_round`` > 0) each
round also writes its refreshed ``reward_model``, ``reward_stats`` and the labelled
``refresh_pairs`` so far, and the next round labels with them.
"""

from functools import partial, update_wrapper

from kedro.pipeline import Node, Pipeline

from .nodes import (
    count_gold_labels,
    label_round,
    refresh_reward_model,
    rescore_round,
    sample_round,
    train_round,
)

SHARED = ["tokenizer", "tokenized_prompts", "tokenized_examples", "preference_pairs",
          "preference_groups", "sft_model", "gold_judge_model"]
PARAMS = {"params:rpo_online", "params:evaluation", "params:reward_model"}


def _for_round(fn, r: int, **kwargs):
    """``fn`` with ``round_index=r`` bound, keeping its name and docstring for kedro-viz."""
    return update_wrapper(partial(fn, round_index=r, **kwargs), fn)


def round_template(r: int, refresh: bool) -> Pipeline:
    nodes = [
        Node(_for_round(sample_round, r),
             inputs=["previous_policy", "tokenizer", "tokenized_prompts", "params:rpo_online"],
             outputs="samples", name="sample_round"),
        Node(label_round,
             inputs=["samples", "current_reward_model", "sft_model", "tokenizer",
                     "current_reward_stats", "preference_groups", "gold_judge_model", "params:rpo_online",
                     "params:evaluation", "params:reward_model"],
             outputs="labelled_samples", name="label_round"),
    ]
    if refresh:
        previous = {} if r == 1 else {"previous_pairs": "previous_refresh_pairs"}
        nodes += [
            Node(_for_round(refresh_reward_model, r),
                 inputs={"labelled": "labelled_samples", "reward_model": "current_reward_model",
                         "tokenizer": "tokenizer", "tokenized": "tokenized_examples",
                         "pairs": "preference_pairs", "groups": "preference_groups",
                         "params": "params:rpo_online",
                         "reward_model_params": "params:reward_model"} | previous,
                 outputs=["reward_model", "reward_stats", "refresh_pairs", "refresh_metrics"],
                 name="refresh_reward_model"),
            Node(rescore_round,
                 inputs=["labelled_samples", "reward_model", "reward_stats", "params:rpo_online",
                         "params:reward_model"],
                 outputs="training_samples", name="rescore_round"),
        ]
    nodes.append(Node(_for_round(train_round, r),
                      inputs=["previous_policy", "tokenizer",
                              "training_samples" if refresh else "labelled_samples",
                              "checkpoints", "params:rpo_online"],
                      outputs=["policy_model", "training_history", "train_metrics"],
                      name="train_round"))
    return Pipeline(nodes)


def create_pipeline(rounds: int = 2, refresh: bool = False, **kwargs) -> Pipeline:
    """``rounds`` rounds chained policy to policy; ``rpo_online.policy_model`` is the last one's.
    With ``refresh``, round r labels with round r-1's refreshed reward model."""
    if rounds < 1:
        raise ValueError(f"rpo_online.rounds must be at least 1, got {rounds}")
    out = Pipeline([])
    for r in range(1, rounds + 1):
        prev = f"rpo_online.round_{r - 1}"
        previous = "sft_model" if r == 1 else f"{prev}.policy_model"
        current_rm = ({"current_reward_model": "reward_model", "current_reward_stats": "reward_stats"}
                      if r == 1 or not refresh else
                      {"current_reward_model": f"{prev}.reward_model",
                       "current_reward_stats": f"{prev}.reward_stats"})
        pairs = {"previous_refresh_pairs": f"{prev}.refresh_pairs"} if refresh and r > 1 else {}
        outputs = ({"policy_model": "rpo_online.policy_model",
                    "training_history": "rpo_online.training_history"} if r == rounds else None)
        template = round_template(r, refresh)
        out += Pipeline(template, namespace=f"rpo_online.round_{r}",
                        inputs={"previous_policy": previous, **current_rm, **pairs,
                                **{s: s for s in SHARED if s in template.inputs()}},
                        outputs=outputs, parameters=PARAMS)
    last = f"rpo_online.round_{rounds}.refresh_pairs"
    out += Pipeline([Node(count_gold_labels,
                          inputs={"reward_model_history": "reward_model.training_history",
                                  "params": "params:rpo_online"}
                          | ({"refresh_pairs": last} if refresh else {}),
                          outputs="rpo_online.label_metrics", name="rpo_online.count_gold_labels")])
    return out
