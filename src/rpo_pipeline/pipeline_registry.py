"""Project pipelines.

Stages, in run order: ``data_processing`` -> ``reference`` -> ``reward_model`` -> ``dpo`` / ``rpo``
-> ``evaluation``. Each stage's pipeline includes the stages it needs, so
``kedro run --pipelines=<stage>`` works on a fresh clone; cached stages (SFT, reference log-probs)
skip their work when their inputs are unchanged.
"""

from __future__ import annotations

from kedro.pipeline import Pipeline

from rpo_pipeline.pipelines import (
    data_processing,
    evaluation,
    policy_training,
    reference,
    reward_model,
)


def register_pipelines() -> dict[str, Pipeline]:
    """Every stage by name (with its upstream stages), and ``__default__`` = all of them."""
    dp = data_processing.create_pipeline()
    ref = reference.create_pipeline()
    rm = reward_model.create_pipeline()
    pipelines = {
        "data_processing": dp,
        "reference": dp + ref,
        "reward_model": dp + ref + rm,  # the reward model starts from the SFT model
        "dpo": dp + ref + policy_training.create_pipeline(namespace="dpo"),
        "rpo": dp + ref + rm + policy_training.create_pipeline(namespace="rpo"),
    }
    # evaluation compares the reference with both policies (and scores with the reward model)
    pipelines["evaluation"] = (pipelines["dpo"] + pipelines["rpo"]
                               + evaluation.create_pipeline(policies=("dpo", "rpo")))
    pipelines["__default__"] = sum(pipelines.values(), Pipeline([]))
    return pipelines
