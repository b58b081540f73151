"""`kedro run --pipelines=data_processing` end to end, with counts in MLflow."""

from __future__ import annotations

import pandas as pd
import pytest
from conftest import mlflow_runs, run_kedro, shared_file

pytestmark = pytest.mark.slow


def _metrics(project):
    run = mlflow_runs(project)[0]
    return run, {k.removeprefix("data_processing."): v for k, v in run.data.metrics.items()}


def test_pipelines_are_registered():
    from kedro.framework.project import configure_project, pipelines

    configure_project("rpo_pipeline")
    assert "data_processing" in pipelines and "__default__" in pipelines
    assert {n.name for n in pipelines["data_processing"].nodes} >= {
        "ingest_preferences", "split_by_prompt", "build_base_model", "tokenize_responses"}


def test_default_run_logs_counts_and_splits_by_prompt(project_copy):
    run_kedro(project_copy, ["data_processing"])
    run, m = _metrics(project_copy)
    assert run.info.run_name == "data_processing" and run.info.status == "FINISHED"
    assert m["rows_in"] == 2800 == m["rows_out"] + m["rows_dropped"]
    assert m["groups_train"] >= 2000 and m["groups_val"] >= 200 and m["groups_test"] >= 200
    assert run.data.params["data_processing.split.train"] == "0.8"  # params are flattened
    groups = pd.read_parquet(project_copy / "data/03_primary/preference_groups.parquet")
    assert groups.groupby("prompt")["split"].nunique().max() == 1
    tok = pd.read_parquet(project_copy / "data/05_model_input/tokenized_examples.parquet")
    assert len(tok) == m["examples"] == 4 * 2800
    assert (project_copy / "data/06_models/base_model/model.safetensors").exists()


def _run_env(project, env, data_path):
    catalog = project / "conf" / env / "catalog.yml"
    text = catalog.read_text()
    catalog.write_text(text.replace(text.split("filepath: ")[1].split("\n")[0], str(data_path)))
    run_kedro(project, ["data_processing"], env=env)
    return _metrics(project)[1]


def test_hh_env(project_copy):
    path = shared_file("hh_rlhf/helpful-base_test.jsonl.gz")
    m = _run_env(project_copy, "hh_rlhf", path)
    assert m["rows_in"] == 2354 == m["rows_out"] + m["rows_dropped"]
    dropped = pd.read_csv(project_copy / "data/02_intermediate/dropped_rows.csv")
    assert len(dropped) == m["rows_dropped"] and dropped["reason"].notna().all()
    groups = pd.read_parquet(project_copy / "data/03_primary/preference_groups.parquet")
    assert groups.groupby("prompt")["split"].nunique().max() == 1


def test_ultrafeedback_env(project_copy):
    path = shared_file("ultrafeedback_binarized_1k/train_clean.jsonl")
    m = _run_env(project_copy, "ultrafeedback", path)
    assert m["rows_in"] == 1000 == m["rows_out"] + m["rows_dropped"]
    pairs = pd.read_parquet(project_copy / "data/03_primary/preference_pairs.parquet")
    assert len(pairs) == m["rows_out"] and pairs["score_chosen"].notna().all()
    assert (pairs["score_chosen"] >= pairs["score_rejected"]).all()


TINY_RUN = {"base_model.model.n_layer": 1, "base_model.model.n_embd": 32, "base_model.model.n_head": 2,
            "reference.sft.steps": 3,
            "reference.sft.progress": False, "reference.device": "cpu"}


def _reference_metrics(project):
    run = mlflow_runs(project)[0]
    return {k.removeprefix("reference."): v for k, v in run.data.metrics.items()
            if k.startswith("reference.")}


def test_reference_twice_hits_both_caches(project_copy):
    """`kedro run --pipelines=reference` twice: the second run trains and scores nothing."""
    run_kedro(project_copy, ["reference"], runtime_params=TINY_RUN)
    first = _reference_metrics(project_copy)
    assert first["sft_cache_hit"] == 0 and first["cache_hit"] == 0
    assert first["cache_sequences"] > 10_000 and "sft_loss" in first and "sft_val_loss" in first
    sft_dir = project_copy / "data/06_models/sft_model"
    assert (sft_dir / "model.safetensors").exists() and (sft_dir / "fingerprint.json").exists()

    run_kedro(project_copy, ["reference"], runtime_params=TINY_RUN)
    second = _reference_metrics(project_copy)
    assert second["sft_cache_hit"] == 1 and second["cache_hit"] == 1
    assert second["sft_seconds"] + second["cache_seconds"] < 0.1 * (
        first["sft_seconds"] + first["cache_seconds"])

    run_kedro(project_copy, ["reference"],
              runtime_params={**TINY_RUN, "data_processing.max_length": 120})
    third = _reference_metrics(project_copy)
    assert third["sft_cache_hit"] == 1 and third["cache_hit"] == 0  # only the cache recomputes


def test_reward_model_pipeline_trains_scores_and_hits(project_copy):
    """`kedro run --pipelines=reward_model` (tiny sizes): metrics, 4-bit footprint, cache hit."""
    params = {**TINY_RUN, "reward_model.train.steps": 3, "reward_model.train.progress": False,
              "reward_model.device": "cpu"}
    run_kedro(project_copy, ["reward_model"], runtime_params=params)
    run = mlflow_runs(project_copy)[0]
    m = {k.removeprefix("reward_model."): v for k, v in run.data.metrics.items()
         if k.startswith("reward_model.")}
    assert run.info.run_name == "reward_model"
    assert {"loss", "accuracy", "margin", "val_accuracy", "test_accuracy"} <= set(m)
    assert 0 < m["weight_bytes"] < m["weight_bytes_full_precision"]
    scores = pd.read_parquet(project_copy / "data/07_model_output/reward_scores.parquet")
    assert set(scores["split"]) == {"train", "val"} and scores["reward"].notna().all()
    stats = __import__("json").loads((project_copy / "data/07_model_output/reward_stats.json").read_text())
    assert stats["count"] == (scores["split"] == "train").sum() and stats["std"] > 0

    run_kedro(project_copy, ["reward_model"], runtime_params=params)
    again = {k: v for k, v in mlflow_runs(project_copy)[0].data.metrics.items()}
    assert again["reward_model.cache_hit"] == 1 and again["reward_model.score_cache_hit"] == 1
    assert again["reference.sft_cache_hit"] == 1


def test_dpo_pipeline_logs_trl_metrics_and_saves_policy(project_copy):
    """`kedro run --pipelines=dpo` (tiny sizes): TRL-named metrics, eval metrics, policy artifact."""
    params = {**TINY_RUN, "dpo.train.steps": 4, "dpo.train.eval_every": 2, "dpo.train.log_every": 2,
              "dpo.train.progress": False, "dpo.device": "cpu"}
    run_kedro(project_copy, ["dpo"], runtime_params=params)
    run = mlflow_runs(project_copy)[0]
    names = {k for k in run.data.metrics if k.startswith("dpo.")}
    for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "logps/rejected", "grad_norm", "learning_rate", "pairs_per_second"):
        assert f"dpo.{name}" in names and (name == "grad_norm" or f"dpo.eval_{name}" in names
                                           or name in ("learning_rate", "pairs_per_second"))
    assert (project_copy / "data/06_models/dpo_policy/model.safetensors").exists()
    import mlflow

    artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "dpo_policy")]
    assert "dpo_policy/model.safetensors" in artifacts
    assert (project_copy / "data/06_models/dpo_checkpoints/last/trainer_state.pt").exists()


def test_dpo_unknown_loss_fails_at_start_with_valid_names(project_copy):
    params = {**TINY_RUN, "dpo.loss": "kto", "dpo.device": "cpu"}
    with pytest.raises(ValueError, match=r"dpo.loss: unknown loss 'kto'; valid: \['hinge', 'ipo', 'sigmoid'\]"):
        run_kedro(project_copy, ["dpo"], runtime_params=params)
    assert not any((project_copy / "data/02_intermediate").iterdir())  # before any node ran


def test_rpo_pipeline_trains_on_reward_model_scores(project_copy):
    """`kedro run --pipelines=rpo` (tiny sizes): K = 4 groups, RPO metrics, gold-pair eval, policy."""
    params = {**TINY_RUN, "reward_model.train.steps": 2, "reward_model.train.progress": False,
              "reward_model.device": "cpu", "rpo.train.steps": 4, "rpo.train.eval_every": 2,
              "rpo.train.log_every": 2, "rpo.train.progress": False, "rpo.device": "cpu"}
    run_kedro(project_copy, ["rpo"], runtime_params=params)
    run = mlflow_runs(project_copy)[0]
    names = {k for k in run.data.metrics if k.startswith("rpo.")}
    assert {"rpo.loss", "rpo.target_margin", "rpo.ranking_agreement", "rpo.rewards/accuracies",
            "rpo.eval_rewards/accuracies", "rpo.eval_target_margin", "rpo.pairs_per_second"} <= names
    assert (project_copy / "data/06_models/rpo_policy/model.safetensors").exists()
    with pytest.raises(ValueError, match=r"rpo.distance: unknown distance 'js'"):
        run_kedro(project_copy, ["rpo"], runtime_params={**params, "rpo.distance": "js"})
