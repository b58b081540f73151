"""policy_training template, one instance per method (``dpo``, ``rpo``) in that method's
namespace, with that method's parameters."""

from kedro.pipeline import Node, Pipeline

from .nodes import TRAINERS

SHARED = ["sft_model", "tokenizer", "tokenized_examples", "preference_pairs", "reference_logprobs"]


def create_pipeline(method: str = "dpo", **kwargs) -> Pipeline:
    """``<method>.policy_model``, ``<method>.curve_policies`` (intermediate policies),
    ``<method>.training_history`` and ``<method>.train_metrics`` from params ``<method>``, by the
    method's node (``nodes.TRAINERS``)."""
    if method not in TRAINERS:
        raise ValueError(f"policy_training: unknown method {method!r}; known: {', '.join(TRAINERS)}")
    train, extra = TRAINERS[method]
    inputs = [*SHARED, *extra]
    template = Pipeline([
        Node(train, inputs=[*inputs, "checkpoints", "params:policy", "params:evaluation"],
             outputs=["policy_model", "curve_policies", "training_history", "train_metrics"],
             name="train_policy"),
    ])
    return Pipeline(template, namespace=method, inputs=set(inputs),
                    parameters={"params:policy": f"params:{method}", "params:evaluation": "params:evaluation"})
