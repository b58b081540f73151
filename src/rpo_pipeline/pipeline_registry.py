"""Project pipelines.

Stages, in run order: ``data_processing`` -> ``reference`` -> ``reward_model`` -> ``dpo`` / ``rpo``
/ ``rpo_online`` -> ``evaluation``. Each stage's pipeline includes the stages it needs, so
``kedro run --pipelines=<stage>`` works on a fresh clone; cached stages (SFT, reference log-probs)
skip their work when their inputs are unchanged.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from kedro.pipeline import Pipeline

from rpo_pipeline.pipelines import (
    data_processing,
    evaluation,
    policy_training,
    reference,
    reward_model,
    rpo_online,
)

# rpo_online.rounds of the run's merged parameters (conf/base + --env + --params), set by the
# ValidateParameters hook when the Kedro context is created, before the pipelines are built.
_online_rounds: int | None = None


def set_online_rounds(rounds: int) -> bool:
    """Unroll ``rounds`` online rounds from now on; True if that changes the registered DAG."""
    global _online_rounds
    changed = rounds != _online_rounds
    _online_rounds = rounds
    return changed


def online_rounds() -> int:
    """The rounds to unroll: the run's parameters, else conf/base (``kedro registry`` without a
    context)."""
    if _online_rounds is not None:
        return _online_rounds
    conf = Path(__file__).resolve().parents[2] / "conf" / "base" / "parameters_rpo_online.yml"
    return int(yaml.safe_load(conf.read_text())["rpo_online"]["rounds"]) if conf.exists() else 2


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
        "rpo_online": dp + ref + rm + rpo_online.create_pipeline(rounds=online_rounds()),
    }
    # evaluation compares the reference with every policy (and scores with the reward model)
    policies = ("dpo", "rpo", "rpo_online")
    pipelines["evaluation"] = (sum((pipelines[p] for p in policies), Pipeline([]))
                               + evaluation.create_pipeline(policies=policies))
    pipelines["__default__"] = sum(pipelines.values(), Pipeline([]))
    return pipelines
