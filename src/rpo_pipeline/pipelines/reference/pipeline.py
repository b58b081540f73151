"""reference pipeline wiring."""

from kedro.pipeline import Node, Pipeline

from .nodes import build_reference_cache, train_sft


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                train_sft,
                inputs=["base_model", "tokenizer", "tokenized_examples", "tokenized_sft_targets",
                        "preference_pairs",
                        "sft_model_stored_fingerprint", "params:reference"],
                outputs=["sft_model", "reference_sft_metrics"],
                name="train_sft",
            ),
            Node(
                build_reference_cache,
                inputs=["sft_model", "tokenizer", "tokenized_examples",
                        "reference_logprobs_stored_fingerprint", "params:data_processing",
                        "params:reference"],
                outputs=["reference_logprobs", "reference_cache_metrics"],
                name="build_reference_cache",
            ),
        ]
    )
