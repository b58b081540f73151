"""policy_training template, namespaced per method (``dpo``, ``rpo``)."""

from kedro.pipeline import Node, Pipeline

from .nodes import train_policy, train_rpo_policy

SHARED = ["sft_model", "tokenizer", "tokenized_examples", "preference_pairs", "reference_logprobs"]
RPO_INPUTS = ["preference_groups", "reward_scores", "reward_stats"]


def create_pipeline(namespace: str = "dpo", **kwargs) -> Pipeline:
    """``<namespace>.policy_model`` and ``<namespace>.train_metrics`` from params ``<namespace>``.

    ``rpo`` also reads the reward model's scores; every other namespace trains a DPO-family loss.
    """
    rpo = namespace == "rpo"
    inputs = [*SHARED, *RPO_INPUTS] if rpo else SHARED
    template = Pipeline([
        Node(
            train_rpo_policy if rpo else train_policy,
            inputs=[*inputs, "params:policy"],
            outputs=["policy_model", "train_metrics"],
            name="train_policy",
        ),
    ])
    return Pipeline(template, namespace=namespace, inputs=set(inputs),
                    parameters={"params:policy": f"params:{namespace}"})
