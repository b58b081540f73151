"""policy_training template, namespaced per method (``dpo``, ``rpo``)."""

from kedro.pipeline import Node, Pipeline

from .nodes import train_policy

SHARED = ["sft_model", "tokenizer", "tokenized_examples", "preference_pairs", "reference_logprobs"]


def create_pipeline(namespace: str = "dpo", **kwargs) -> Pipeline:
    """``<namespace>.policy_model`` and ``<namespace>.train_metrics`` from params ``<namespace>``."""
    template = Pipeline([
        Node(
            train_policy,
            inputs=[*SHARED, "params:policy"],
            outputs=["policy_model", "train_metrics"],
            name="train_policy",
        ),
    ])
    return Pipeline(template, namespace=namespace, inputs=set(SHARED),
                    parameters={"params:policy": f"params:{namespace}"})
