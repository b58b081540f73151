"""Pipelines end to end: `kedro run --pipelines=...` in a project copy, or the outputs of the
session's shared tiny evaluation run (``tiny_run``, conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from helpers import TINY_ONLINE, TINY_RUN, kedro_env, mlflow_runs, run_kedro, shared_file


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
    assert m["rows_in"] == 2550 == m["rows_out"] + m["rows_dropped"]
    assert m["groups_train"] >= 2000 and m["groups_val"] >= 200 and m["groups_test"] >= 200
    assert run.data.params["data_processing.split.train"] == "0.8"  # params are flattened
    groups = pd.read_parquet(project_copy / "data/03_primary/preference_groups.parquet")
    assert groups.groupby("prompt")["split"].nunique().max() == 1
    tok = pd.read_parquet(project_copy / "data/05_model_input/tokenized_examples.parquet")
    assert len(tok) == m["examples"] == 4 * 2550
    assert (project_copy / "data/06_models/base_model/model.safetensors").exists()


def _data_processing_on(project, env, data_path):
    """`kedro run --pipelines=data_processing` with ``env``'s settings on ``data_path`` (a
    temporary env: ``env``'s files with raw_preferences pointing there)."""
    run_kedro(project, ["data_processing"], env=kedro_env(
        project, f"test_{env}", like=env, catalog={"raw_preferences": {"filepath": str(data_path)}}))
    m = _metrics(project)[1]
    assert m["rows_in"] == m["rows_out"] + m["rows_dropped"]
    return m, pd.read_parquet(project / "data/03_primary/preference_groups.parquet")


def test_hh_env(project_copy):
    m, groups = _data_processing_on(project_copy, "hh_rlhf",
                                    shared_file("hh_rlhf/helpful-base_test.jsonl.gz"))
    assert m["rows_in"] == 2354
    dropped = pd.read_csv(project_copy / "data/02_intermediate/dropped_rows.csv")
    assert len(dropped) == m["rows_dropped"] and dropped["reason"].notna().all()
    assert groups.groupby("prompt")["split"].nunique().max() == 1


def test_ultrafeedback_env(project_copy):
    m, _ = _data_processing_on(project_copy, "ultrafeedback",
                               shared_file("ultrafeedback_binarized_1k/train_clean.jsonl"))
    assert m["rows_in"] == 1000
    pairs = pd.read_parquet(project_copy / "data/03_primary/preference_pairs.parquet")
    assert len(pairs) == m["rows_out"] and pairs["score_chosen"].notna().all()
    assert (pairs["score_chosen"] >= pairs["score_rejected"]).all()


def _reference_metrics(project):
    run = mlflow_runs(project)[0]
    return {k.removeprefix("reference."): v for k, v in run.data.metrics.items()
            if k.startswith("reference.")}


def test_reference_twice_hits_both_caches(project_copy):
    """`kedro run --pipelines=reference` twice: the second run trains and scores nothing."""
    run_kedro(project_copy, ["reference"], runtime_params=TINY_RUN)
    first = _reference_metrics(project_copy)
    assert first["sft_cache_hit"] == 0 and first["cache_hit"] == 0
    assert first["cache_sequences"] == 4 * (2034 + 252) and "sft_loss" in first and "sft_val_loss" in first
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

    history_file = project_copy / "data/06_models/training_history/reward_model.json"
    history = json.loads(history_file.read_text())
    assert history["data"]["val_accuracy"][0]["value"] == pytest.approx(m["val_accuracy"])
    assert history["fingerprint"] == json.loads(
        (project_copy / "data/06_models/reward_model/fingerprint.json").read_text())["fingerprint"]
    mtime = history_file.stat().st_mtime_ns

    run_kedro(project_copy, ["reward_model"], runtime_params=params)
    again = {k: v for k, v in mlflow_runs(project_copy)[0].data.metrics.items()}
    assert again["reward_model.cache_hit"] == 1 and again["reward_model.score_cache_hit"] == 1
    assert again["reference.sft_cache_hit"] == 1
    assert history_file.stat().st_mtime_ns == mtime  # a cache hit keeps the stored history

    history_file.unlink()  # the history is part of the cache entry: without it, retrain
    run_kedro(project_copy, ["reward_model"], runtime_params=params)
    assert mlflow_runs(project_copy)[0].data.metrics["reward_model.cache_hit"] == 0
    assert json.loads(history_file.read_text())["data"]["val_accuracy"] == history["data"]["val_accuracy"]


def test_dpo_logs_trl_metrics_and_saves_policy(tiny_run):
    """The dpo stage of the shared tiny run: TRL-named metrics, eval metrics, policy artifact."""
    names = {k for k in tiny_run.metrics if k.startswith("dpo.")}
    for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "logps/rejected", "grad_norm", "learning_rate", "pairs_per_second"):
        assert f"dpo.{name}" in names and (name == "grad_norm" or f"dpo.eval_{name}" in names
                                           or name in ("learning_rate", "pairs_per_second"))
    assert (tiny_run.project / "data/06_models/dpo_policy/model.safetensors").exists()
    import mlflow

    artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(tiny_run.run.info.run_id, "dpo_policy")]
    assert "dpo_policy/model.safetensors" in artifacts
    assert (tiny_run.project / "data/06_models/checkpoints/dpo/last/trainer_state.json").exists()


def test_dpo_unknown_loss_fails_at_start_with_valid_names(project_copy):
    params = {**TINY_RUN, "dpo.loss": "kto", "dpo.device": "cpu"}
    with pytest.raises(ValueError, match=r"dpo.loss = 'kto': must be 'sigmoid', 'ipo' or 'hinge'"):
        run_kedro(project_copy, ["dpo"], runtime_params=params)
    assert not any((project_copy / "data/02_intermediate").iterdir())  # before any node ran


def test_rpo_trains_on_reward_model_scores(tiny_run):
    """The rpo stage of the shared tiny run: K = 4 groups, RPO metrics, gold-pair eval, policy."""
    names = {k for k in tiny_run.metrics if k.startswith("rpo.")}
    assert {"rpo.loss", "rpo.target_margin", "rpo.ranking_agreement", "rpo.rewards/accuracies",
            "rpo.eval_rewards/accuracies", "rpo.eval_target_margin", "rpo.pairs_per_second"} <= names
    assert (tiny_run.project / "data/06_models/rpo_policy/model.safetensors").exists()


def test_evaluation_compares_policies_with_the_reference(tiny_run):
    """The evaluation stage of the shared tiny run: per-policy metrics, tables, PNGs, summary."""
    project, run, m = tiny_run.project, tiny_run.run, tiny_run.metrics
    for policy in ("reference", "dpo", "rpo", "rpo_online"):
        for name in ("gold_reward_mean", "rm_score_mean", "kl_to_reference", "win_rate_gold",
                     "win_rate_rm", "preference_accuracy", "length_mean", "distinct_2"):
            assert f"evaluation.{policy}.{name}" in m, (policy, name)
    assert m["evaluation.reference.kl_to_reference"] == 0.0
    assert m["evaluation.reference.win_rate_gold"] == 0.5 == m["evaluation.reference.preference_accuracy"]
    assert 0 <= m["evaluation.dpo.gold_reward_mean"] <= 1 and m["evaluation.dpo.length_mean"] <= 6
    prompts, n_samples = tiny_run.params["evaluation.max_prompts"], tiny_run.params["evaluation.sampling.n_samples"]

    samples = pd.read_parquet(project / "data/07_model_output/evaluation/scored_samples.parquet")
    assert len(samples) == 4 * prompts * (n_samples + 1)  # policies x prompts x (samples + greedy)
    assert samples.groupby("policy")["group_id"].nunique().eq(prompts).all()
    ref = samples[samples["policy"] == "reference"]
    assert (ref["logp"] == ref["ref_logp"]).all() and samples["rm"].notna().all()
    report = project / "data/08_reporting"
    table = pd.read_csv(report / "evaluation_samples.csv")
    assert len(table) == prompts and {"prompt", "reference", "dpo", "rpo", "rpo_online", "dpo_gold"} <= set(
        table.columns)
    for png in ("training_curves.png", "reward_vs_kl.png", "win_rates.png"):
        assert (report / png).read_bytes()[:4] == b"\x89PNG"
    assert "| dpo |" in (report / "evaluation_summary.md").read_text()
    import mlflow

    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/training_curves.png", "evaluation/reward_vs_kl.png", "evaluation/win_rates.png",
            "evaluation/evaluation_summary.md", "evaluation/evaluation_metrics.csv",
            "evaluation/samples_table.json", "evaluation/summary.json"} <= artifacts
    # the summary table: one row per policy, the compare view charts its columns across runs
    summary = mlflow.load_table("evaluation/summary.json", run_ids=[run.info.run_id])
    assert sorted(summary["policy"]) == ["dpo", "reference", "rpo", "rpo_online"]
    assert summary.set_index("policy").loc["dpo", "gold_reward_mean"] == pytest.approx(
        m["evaluation.dpo.gold_reward_mean"])
    # kedro-viz previews: the first rows of the report tables
    from rpo_pipeline.datasets import ReportTableDataset

    preview = ReportTableDataset(filepath=str(report / "evaluation_metrics.parquet")).preview(2)
    assert preview["columns"][0] == "policy" and len(preview["data"]) == 2
    gold = preview["data"][1][preview["columns"].index("gold_reward_mean")]
    assert gold == round(gold, 4) and gold == pytest.approx(m["evaluation.dpo.gold_reward_mean"], abs=5e-5)
    # training histories are catalog datasets (<method>.training_history) the plots read
    histories = project / "data/06_models/training_history"
    for name in ("dpo", "rpo", "rpo_online", "reward_model"):
        data = json.loads((histories / f"{name}.json").read_text())
        data = data.get("data", data)  # the reward model's carries its cache fingerprint
        assert data["loss"] and all(set(e) == {"value", "step"} for e in data["loss"]), name
    assert not list((project / "data/06_models").rglob("training_history.json"))


def test_curves_have_a_point_per_checkpoint_and_method(tiny_run):
    """evaluation.curves: the reference (step 0) and evaluation.curve.points policies per method
    (dpo / rpo: 4 steps, points at 1, 2, 3 and the trained policy; rpo_online: its 3 rounds), each
    kept as a catalog dataset; the plot; matched-KL gold in MLflow."""
    project, m = tiny_run.project, tiny_run.metrics
    curves = pd.read_csv(project / "data/08_reporting/evaluation_curves.csv")
    steps = curves.groupby("method")["step"].apply(list).to_dict()
    assert steps == {"dpo": [0, 1, 2, 3, 4], "rpo": [0, 1, 2, 3, 4], "rpo_online": [0, 2, 4, 6]}
    assert (curves.loc[curves["step"] == 0, "kl"] == 0).all() and curves["gold"].between(0, 1).all()
    assert (curves["samples"] == 2 * 2).all()  # curve.prompts (2) x sampling.n_samples
    kept = project / "data/06_models/curve_policies"
    assert sorted(p.name for p in (kept / "dpo").iterdir()) == ["1", "2", "3"]
    assert (project / "data/08_reporting/overoptimization.png").read_bytes()[:4] == b"\x89PNG"
    assert {f"evaluation.curve.{x}.gold_at_matched_kl" for x in ("dpo", "rpo", "rpo_online")} <= set(m)


def test_run_is_tagged_with_what_ran_and_the_precision(tiny_run):
    """hooks.TagRuns: the pipelines, methods, env, commit, and what decides the last digits."""
    import torch

    tags = tiny_run.run.data.tags
    assert tags["rpo_pipeline.pipelines"] == "evaluation" and tags["rpo_pipeline.env"] == "local"
    assert tags["rpo_pipeline.methods"] == "dpo,rpo,rpo_online"
    assert tags["mlflow.source.git.commit"] == "unknown"  # the test's project copy has no git
    assert tags["rpo_pipeline.precision"] == "fp32"  # auto on a CPU, whatever the CPU
    assert tags["rpo_pipeline.cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert tags["rpo_pipeline.cpu_bf16"]
    bits = {k: v for k, v in tiny_run.metrics.items() if k.endswith("precision_bits")}
    assert len(bits) >= 5 and set(bits.values()) == {32}, bits


def test_online_rounds_log_per_round_metrics(tiny_run):
    """rpo_online.rounds=3 from --params in the shared tiny run: three rounds unrolled, metrics per
    round, the last round's policy saved as rpo_online.policy_model."""
    m, project = tiny_run.metrics, tiny_run.project
    for r in (1, 2, 3):
        assert {f"rpo_online.round_{r}.{k}" for k in ("loss", "sample_reward_mean", "prompts")} <= set(m)
    assert m["rpo_online.round_3.prompts"] == 8 and "rpo_online.round_4.loss" not in m
    models = project / "data/06_models"
    assert (models / "rpo_online_policy/model.safetensors").exists()
    assert sorted(p.name for p in (models / "rpo_online").iterdir()) == ["round_1_policy",
                                                                         "round_2_policy"]
    samples = pd.read_parquet(project / "data/07_model_output/rpo_online/round_3_samples.parquet")
    assert len(samples) == 2 * 8 and samples["group_id"].nunique() == 8


def _default_outputs(data: Path) -> dict[str, str]:
    """Digest of every model folder and output file of the default pipeline (``generated/`` and
    what generate_preferences writes excluded)."""
    from rpo_pipeline.fingerprint import hash_dir, hash_file

    out = {}
    for layer in ("06_models", "07_model_output", "08_reporting"):
        for path in sorted((data / layer).rglob("*")):
            rel = path.relative_to(data)
            if "generated" in rel.parts[1] or rel.parts[1] == "sources" or ".gitkeep" in rel.name:
                continue
            if path.is_file():
                out[str(rel)] = hash_file(path)
    for model in sorted((data / "06_models").iterdir()):
        if model.is_dir() and model.name not in ("generated", "sources"):
            out[f"{model.name}/"] = hash_dir(model)
    return out


def test_generated_pipeline_trains_every_method_on_generated_preferences(tiny_run, tiny_run_copy):
    """`--pipelines=generated` (tiny sizes) after the default stages: π_SFT's samples judged by
    VADER become the groups that the reward model, dpo, rpo and rpo_online train on, evaluation
    on the test prompts; everything it trains and reports sits under ``generated/``, and every
    model and output file of the default run is left byte for byte as it was."""
    project = tiny_run_copy
    data = project / "data"
    before = _default_outputs(data)
    assert {"sft_model/", "reward_model/", "dpo_policy/", "rpo_policy/", "rpo_online_policy/"} <= set(before)
    params = {**tiny_run.params,
              "generate_preferences.max_prompts": 16, "generate_preferences.progress": False,
              "generate_preferences.sampling.max_new_tokens": 8,
              "generate_preferences.device": "cpu"}
    run_kedro(project, ["generated"], runtime_params=params)
    m = mlflow_runs(project)[0].data.metrics
    assert m["generate_preferences.groups"] == 32 and m["generate_preferences.responses"] == 128
    gen = pd.read_parquet(data / "03_primary/generated_preferences.parquet")
    assert set(gen["split"]) == {"train", "val"} and gen["responses"].map(len).eq(4).all()
    scores = pd.read_parquet(data / "07_model_output/generated/reward_scores.parquet")
    assert len(scores) == 128  # the generated reward model scored the generated responses
    cache = pd.read_parquet(data / "07_model_output/generated/reference_logprobs.parquet")
    assert len(cache) == 128  # the generated responses' reference log-probs, their own cache
    for policy in ("dpo", "rpo", "rpo_online"):
        assert (data / f"06_models/generated/{policy}_policy/model.safetensors").is_file()
        assert f"evaluation.{policy}.gold_reward_mean" in m
        assert f"evaluation.{policy}.preference_accuracy" not in m  # no test pairs generated
    after = _default_outputs(data)
    assert after == before, sorted(k for k in before if after.get(k) != before[k])


def test_sweep_script_logs_each_point_under_one_parent_run(project_copy):
    """scripts/sweep.py on a tiny config: two β, one nested MLflow run each, CSVs and the PNG."""
    import importlib.util

    from helpers import ROOT, end_stale_runs

    end_stale_runs()  # before the script points mlflow at this project's store
    spec = importlib.util.spec_from_file_location("sweep", ROOT / "scripts" / "sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    tiny = {**TINY_RUN, "reward_model.train.steps": 2, "reward_model.train.progress": False,
            "reward_model.device": "cpu", "dpo.train.steps": 2, "dpo.train.progress": False,
            "dpo.device": "cpu", "rpo.train.steps": 2, "rpo.train.progress": False,
            "rpo.device": "cpu", **TINY_ONLINE, "evaluation.max_prompts": 4,
            "evaluation.sampling.n_samples": 2, "evaluation.sampling.max_new_tokens": 6,
            "evaluation.progress": False, "evaluation.device": "cpu"}
    points = sweep.main(["--betas", "0.1", "0.5", "--project", str(project_copy), "--params",
                         ",".join(f"{k}={v}" for k, v in tiny.items()), "--out", "results/fr"])
    assert sorted(points["method"].unique()) == ["dpo", "reference", "rpo", "rpo_online"]
    assert len(points) == 1 + 3 * 2 and (points["split"] == "val").all()
    assert points.loc[points["method"] == "reference", "kl"].eq(0).all()
    csv = pd.read_csv(project_copy / "results/fr.csv")
    assert len(csv) == len(points) and (project_copy / "results/fr_matched.csv").exists()
    assert (project_copy / "results/fr.png").read_bytes()[:4] == b"\x89PNG"
    runs = mlflow_runs(project_copy)
    parent = [r for r in runs if r.data.tags.get("sweep.parent") == "1"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert sorted(r.data.tags["sweep.beta"] for r in children) == ["0.1", "0.5"]
    assert {r.data.params["dpo.beta"] for r in children} == {"0.1", "0.5"}
    assert all(r.data.params["evaluation.split"] == "val" for r in children)
