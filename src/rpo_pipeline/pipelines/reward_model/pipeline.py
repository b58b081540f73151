"""reward_model pipeline wiring."""

from kedro.pipeline import Node, Pipeline

from ..data_processing.nodes import resolve_model_source
from .nodes import (
    package_reward_model,
    reward_normalization,
    score_responses_with_reward_model,
    train_reward_model,
)


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                resolve_model_source,
                inputs="params:reward_model.backbone",
                outputs="reward_model.backbone_source",
                name="resolve_reward_model_backbone",
            ),
            Node(
                train_reward_model,
                inputs=["sft_model", "base_model", "reward_model.backbone_source", "tokenizer",
                        "tokenized_examples",
                        "preference_pairs", "preference_groups", "reward_model_stored_fingerprint",
                        "params:reward_model"],
                outputs=["reward_model", "reward_model.training_history",
                         "reward_model_train_metrics"],
                name="train_reward_model",
            ),
            Node(
                score_responses_with_reward_model,
                inputs=["reward_model", "tokenizer", "tokenized_examples",
                        "reward_scores_stored_fingerprint", "params:reward_model"],
                outputs=["reward_scores", "reward_model_score_metrics"],
                name="score_responses_with_reward_model",
            ),
            Node(
                reward_normalization,
                inputs="reward_scores",
                outputs=["reward_stats", "reward_model_stats_metrics"],
                name="reward_normalization",
            ),
            Node(
                package_reward_model,
                inputs=["reward_model", "reward_model.backbone_source", "sft_model", "base_model",
                        "tokenizer", "preference_groups", "reward_model.training_history",
                        "params:data_processing", "params:reward_model"],
                outputs="reward_model.mlflow_model",
                name="package_reward_model",
            ),
        ]
    )
