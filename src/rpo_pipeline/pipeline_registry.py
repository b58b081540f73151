"""Project pipelines.

Stages, in run order: ``data_processing`` -> ``reference`` -> ``reward_model`` -> ``dpo`` / ``rpo``
/ ``rpo_online`` -> ``evaluation``. Each stage's pipeline includes the stages it needs, so
``kedro run --pipelines=<stage>`` works on a fresh clone; cached stages (SFT, reference log-probs)
skip their work when their inputs are unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from kedro.pipeline import Pipeline

from rpo_pipeline.params import POLICY_METHODS
from rpo_pipeline.pipelines import (
    data_processing,
    evaluation,
    generate_preferences,
    policy_training,
    reference,
    reward_model,
    rpo_online,
)

# What the DAG's shape depends on (Kedro DAGs are static): rpo_online.rounds,
# rpo_online.refresh.labels_per_round > 0 and generate_preferences.judge of the run's merged
# parameters (conf/base + --env + --params), set by the ValidateParameters hook when the Kedro
# context is created, before the pipelines are built.
_shape: dict[str, Any] = {}


def set_run_shape(rounds: int, judge: str, refresh: bool = False) -> bool:
    """Build the DAG for these values from now on; True if that changes it."""
    new = {"rounds": rounds, "judge": judge, "refresh": refresh}
    changed = new != _shape
    _shape.update(new)
    return changed


def run_shape() -> dict[str, Any]:
    """The run's values, else conf/base's (``kedro registry`` outside a run)."""
    if _shape:
        return dict(_shape)
    conf = Path(__file__).resolve().parents[2] / "conf" / "base"
    online = yaml.safe_load((conf / "parameters_rpo_online.yml").read_text())["rpo_online"]
    gen = yaml.safe_load((conf / "parameters_generate_preferences.yml").read_text())
    return {"rounds": int(online["rounds"]), "judge": gen["generate_preferences"]["judge"],
            "refresh": int(online["refresh"]["labels_per_round"]) > 0}


def register_pipelines() -> dict[str, Pipeline]:
    """Every stage by name (with its upstream stages), and ``__default__`` = all of them on the
    dataset's preferences. ``generate_preferences`` samples preferences from π_SFT and
    ``generated`` runs every later stage on them instead (not part of ``__default__``)."""
    shape = run_shape()
    dp = data_processing.create_pipeline()
    ref = reference.create_pipeline()
    rm = reward_model.create_pipeline()
    online = rpo_online.create_pipeline(rounds=shape["rounds"], refresh=shape["refresh"])
    policies = POLICY_METHODS
    pipelines = {
        "data_processing": dp,
        "reference": dp + ref,
        "reward_model": dp + ref + rm,  # the reward model starts from the SFT model
        "dpo": dp + ref + policy_training.create_pipeline(method="dpo"),
        "rpo": dp + ref + rm + policy_training.create_pipeline(method="rpo"),
        "rpo_online": dp + ref + rm + online,
    }
    # evaluation compares the reference with every policy (and scores with the reward model)
    pipelines["evaluation"] = (sum((pipelines[p] for p in policies), Pipeline([]))
                               + evaluation.create_pipeline(policies=policies, rounds=shape["rounds"]))
    pipelines["__default__"] = sum(pipelines.values(), Pipeline([]))

    # the same stages on preferences generated from π_SFT (``--pipelines=generated``)
    sft, cache = ref.only_nodes("train_sft"), ref.only_nodes("build_reference_cache")
    rm_train = rm.only_nodes("train_reward_model")
    rm_score = rm.only_nodes("score_responses_with_reward_model", "reward_normalization")
    judged_by_rm = shape["judge"] == "reward_model"  # the dataset's reward model is the judge
    gen = dp + sft + (rm_train if judged_by_rm else Pipeline([])) \
        + generate_preferences.create_pipeline(judge=shape["judge"])
    pipelines["generate_preferences"] = gen

    def on_generated(p: Pipeline, keep_groups: bool = False) -> Pipeline:
        data = {"tokenized_examples": "generated.tokenized_examples",
                "preference_pairs": "generated.preference_pairs",
                **({} if keep_groups else {"preference_groups": "generated_preferences"})}
        return Pipeline(p, inputs={k: v for k, v in data.items() if k in p.inputs()})

    trained = (gen + on_generated(cache) + (Pipeline([]) if judged_by_rm else on_generated(rm_train))
               + on_generated(rm_score) + online
               + on_generated(policy_training.create_pipeline(method="dpo"))
               + on_generated(policy_training.create_pipeline(method="rpo")))
    # evaluation: the data's held-out prompts (their text from preference_groups)
    pipelines["generated"] = trained + on_generated(
        evaluation.create_pipeline(policies=policies, rounds=shape["rounds"]), keep_groups=True)
    return pipelines
