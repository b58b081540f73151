"""generate_preferences wiring: π_SFT's samples on train/val prompts, judged, as canonical groups;
then the data_processing steps that turn groups into model input, under namespace ``generated``."""

from kedro.pipeline import Node, Pipeline

from rpo_pipeline.pipelines.data_processing.nodes import format_responses, make_pairs, tokenize_responses

from .nodes import judge_with_gold, judge_with_reward_model, sample_responses


def create_pipeline(judge: str = "gold", **kwargs) -> Pipeline:
    """``generated_preferences`` (+ ``generated.preference_pairs``, ``generated.tokenized_examples``)
    judged by ``gold`` (evaluation.gold_judge) or the ``reward_model``."""
    if judge == "gold":
        judging = Node(judge_with_gold,
                       inputs=["generated_samples", "preference_groups", "gold_judge_model",
                               "params:evaluation"],
                       outputs=["generated_preferences", "generate_preferences_metrics"],
                       name="judge_with_gold")
    elif judge == "reward_model":
        judging = Node(judge_with_reward_model,
                       inputs=["generated_samples", "preference_groups", "reward_model", "tokenizer",
                               "params:generate_preferences"],
                       outputs=["generated_preferences", "generate_preferences_metrics"],
                       name="judge_with_reward_model")
    else:
        raise ValueError(f"generate_preferences.judge must be 'gold' or 'reward_model', got {judge!r}")
    generate = Pipeline([
        Node(sample_responses,
             inputs=["sft_model", "tokenizer", "tokenized_prompts", "params:generate_preferences"],
             outputs="generated_samples", name="sample_responses"),
        judging,
    ])
    # the generated groups through data_processing's own steps (names under ``generated.``)
    prepare = Pipeline([
        Node(make_pairs, inputs=["preference_groups", "params:data_processing"],
             outputs="preference_pairs", name="make_pairs"),
        Node(format_responses, inputs=["preference_groups", "tokenizer", "params:data_processing"],
             outputs="formatted_examples", name="format_responses"),
        Node(tokenize_responses, inputs=["formatted_examples", "tokenizer", "params:data_processing"],
             outputs="tokenized_examples", name="tokenize_responses"),
    ])
    return generate + Pipeline(prepare, namespace="generated",
                               inputs={"preference_groups": "generated_preferences",
                                       "tokenizer": "tokenizer"},
                               parameters={"params:data_processing"})
