"""Project pipelines.

Stages, in run order: ``data_processing`` -> ``reference`` -> ``reward_model`` -> ``dpo`` / ``rpo``
/ ``rpo_online`` -> ``evaluation``. Each stage's pipeline includes the stages it needs, so
``kedro run --pipelines=<stage>`` works on a fresh clone; cached stages (SFT, reference log-probs)
skip their work when their inputs are unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kedro.framework import project
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

PIPELINES_MODULE = __name__
GENERATED = "generated"  # the namespace of --pipelines=generated's own outputs
# What the DAG's shape depends on (Kedro DAGs are static): rpo_online.rounds,
# rpo_online.refresh.labels_per_round > 0 and generate_preferences.judge. A run's values (its merged
# conf/base + --env + --params) are handed over by ``hooks.ValidateParameters`` through
# ``configure_run_shape``; outside a run they are read through Kedro's config loader.
_run_shape: dict[str, Any] = {}


def shape_of(params: dict[str, Any]) -> dict[str, Any]:
    """The DAG's shape from a merged parameters dictionary."""
    online = params["rpo_online"]
    return {"rounds": int(online["rounds"]), "judge": params["generate_preferences"]["judge"],
            "refresh": int(online["refresh"]["labels_per_round"]) > 0}


def configure_run_shape(params: dict[str, Any]) -> None:
    """Build the pipelines from this run's parameters: when that changes their shape, Kedro's
    project pipelines are reconfigured (``pipelines.configure``: rebuilt on next access)."""
    shape = shape_of(params)
    if shape != _run_shape:
        _run_shape.clear()
        _run_shape.update(shape)
        project.pipelines.configure(PIPELINES_MODULE)


def run_shape() -> dict[str, Any]:
    """The run's shape, else the one of the configuration Kedro's config loader reads
    (conf/base + ``KEDRO_ENV``): ``kedro registry``, kedro-viz."""
    if _run_shape:
        return dict(_run_shape)
    conf = Path(__file__).resolve().parents[2] / "conf"
    loader = project.settings.CONFIG_LOADER_CLASS(conf_source=str(conf), env=os.environ.get("KEDRO_ENV"),
                                                  **project.settings.CONFIG_LOADER_ARGS)
    return shape_of(loader["parameters"])


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
    rm_train = rm.only_nodes("resolve_reward_model_backbone", "train_reward_model")
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

    # every later stage on the generated preferences, under the namespace ``generated``: its models,
    # caches and reports are ``generated.*`` (conf/base/catalog_generated.yml), so this pipeline
    # and ``__default__`` never overwrite each other's outputs; evaluation keeps the data's
    # held-out prompts (their text from preference_groups)
    later = (on_generated(cache) + (Pipeline([]) if judged_by_rm else on_generated(rm_train))
             + on_generated(rm_score) + online
             + on_generated(policy_training.create_pipeline(method="dpo"))
             + on_generated(policy_training.create_pipeline(method="rpo"))
             + on_generated(evaluation.create_pipeline(policies=policies, rounds=shape["rounds"]),
                            keep_groups=True))
    made_before = gen.all_outputs() | gen.inputs() | {"preference_groups"}
    shared = {d for d in later.inputs() if d in made_before and not d.startswith("params:")}
    pipelines["generated"] = gen + Pipeline(later, namespace=GENERATED, inputs={d: d for d in shared},
                                            parameters={d for d in later.inputs() if d.startswith("params:")})
    return pipelines
