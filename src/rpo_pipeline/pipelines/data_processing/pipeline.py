"""data_processing pipeline wiring."""

from kedro.pipeline import Node, Pipeline

from .nodes import (
    build_base_model,
    format_responses,
    ingest_preferences,
    make_pairs,
    resolve_model_source,
    split_by_prompt,
    summarize,
    tokenize_prompts,
    tokenize_responses,
    tokenize_sft_targets,
)


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                ingest_preferences,
                inputs=["raw_preferences", "params:data_processing"],
                outputs=["validated_groups", "dropped_rows", "data_processing_ingest_metrics"],
                name="ingest_preferences",
            ),
            Node(
                split_by_prompt,
                inputs=["validated_groups", "params:data_processing"],
                outputs="preference_groups",
                name="split_by_prompt",
            ),
            Node(
                make_pairs,
                inputs=["preference_groups", "params:data_processing"],
                outputs="preference_pairs",
                name="make_pairs",
            ),
            Node(
                resolve_model_source,
                inputs="params:base_model.name_or_path",
                outputs="base_model_source",
                name="resolve_base_model_source",
            ),
            Node(
                resolve_model_source,
                inputs="params:evaluation.gold_judge_args.model",
                outputs="gold_judge_model",
                name="resolve_gold_judge_model",
            ),
            Node(
                build_base_model,
                inputs=["preference_groups", "base_model_source", "params:base_model",
                        "params:data_processing"],
                outputs=["base_model", "tokenizer"],
                name="build_base_model",
            ),
            Node(
                format_responses,
                inputs=["preference_groups", "tokenizer", "params:data_processing"],
                outputs="formatted_examples",
                name="format_responses",
            ),
            Node(
                tokenize_responses,
                inputs=["formatted_examples", "tokenizer", "params:data_processing"],
                outputs="tokenized_examples",
                name="tokenize_responses",
            ),
            Node(
                tokenize_prompts,
                inputs=["preference_groups", "tokenizer", "params:data_processing"],
                outputs="tokenized_prompts",
                name="tokenize_prompts",
            ),
            Node(
                tokenize_sft_targets,
                inputs=["preference_groups", "tokenizer", "params:data_processing"],
                outputs="tokenized_sft_targets",
                name="tokenize_sft_targets",
            ),
            Node(
                summarize,
                inputs=["preference_groups", "preference_pairs", "tokenized_examples"],
                outputs="data_processing_metrics",
                name="summarize_data",
            ),
        ]
    )
