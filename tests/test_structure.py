"""The pipeline structure as kedro-viz exports it: every registered pipeline and node, with layers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from helpers import base_params

ROUNDS = base_params("rpo_online")["rounds"]
STAGES = {
    "data_processing": {"ingest_preferences", "split_by_prompt", "make_pairs", "resolve_base_model_source",
                        "resolve_gold_judge_model", "build_base_model", "format_responses",
                        "tokenize_responses", "tokenize_prompts", "tokenize_sft_targets", "summarize_data"},
    "reference": {"train_sft", "build_reference_cache"},
    "reward_model": {"resolve_reward_model_backbone", "train_reward_model",
                     "score_responses_with_reward_model", "reward_normalization", "package_reward_model"},
    "dpo": {"dpo.train_policy"},
    "rpo": {"rpo.train_policy"},
    "rpo_online": {f"rpo_online.round_{r}.{step}" for r in range(1, ROUNDS + 1)
                   for step in ("sample_round", "label_round", "train_round")}
                  | {"rpo_online.count_gold_labels"},
    "evaluation": {"evaluation.sample_reference", "evaluation.sample_dpo", "evaluation.sample_rpo",
                   "evaluation.sample_rpo_online", "evaluation.score_samples", "evaluation.pair_accuracy",
                   "evaluation.summarize_evaluation", "evaluation.report_evaluation",
                   "evaluation.score_curves", "evaluation.report_curves",
                   "evaluation.package_dpo", "evaluation.package_rpo", "evaluation.package_rpo_online"},
}
# each stage's pipeline runs the stages it needs
NEEDS = {"data_processing": [], "reference": ["data_processing"],
         "reward_model": ["data_processing", "reference"],
         "dpo": ["data_processing", "reference"],
         "rpo": ["data_processing", "reference", "reward_model"],
         "rpo_online": ["data_processing", "reference", "reward_model"],
         "evaluation": list(STAGES)}
# preferences generated from π_SFT, and every later stage on them: not part of __default__
GENERATED = {"generate_preferences", "generated"}
LAYERS = ["raw", "intermediate", "primary", "feature", "model_input", "models", "model_output",
          "policies", "evaluation", "reporting"]  # in data-flow order (a cycle would show none)


def expected_nodes(pipeline: str) -> set[str]:
    return set().union(*(STAGES[s] for s in [*NEEDS[pipeline], pipeline]))


def test_registry_has_every_pipeline_and_node():
    from kedro.framework.project import configure_project, pipelines

    configure_project("rpo_pipeline")
    assert set(pipelines) == {*STAGES, *GENERATED, "__default__"}
    for name in STAGES:
        assert {n.name for n in pipelines[name].nodes} == expected_nodes(name), name
    assert {n.name for n in pipelines["__default__"].nodes} == set().union(*STAGES.values())
    # the plots' training histories flow through the catalog, visible in the DAG
    report = next(n for n in pipelines["evaluation"].nodes if n.name == "evaluation.report_evaluation")
    assert {f"{m}.training_history" for m in ("dpo", "rpo", "rpo_online", "reward_model")} <= set(
        report.inputs)


def test_kedro_viz_build_exports_every_pipeline_node_and_layer(project_copy: Path):
    """`kedro viz build` (offline) writes the structure kedro-viz shows: check it is all there."""
    kedro = shutil.which("kedro", path=str(Path(sys.executable).parent)) or "kedro"
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "MLFLOW_TRACKING_URI": "sqlite:///:memory:"}
    subprocess.run([kedro, "viz", "build"], cwd=project_copy, env=env, check=True,
                   capture_output=True, timeout=300)
    main = json.loads((project_copy / "build" / "api" / "main").read_text())
    assert {p["id"] for p in main["pipelines"]} == {*STAGES, *GENERATED, "__default__"}
    task_names = {n["full_name"] for n in main["nodes"] if n["type"] == "task"}
    assert task_names == set().union(*STAGES.values())  # the default pipeline
    assert main["layers"] == LAYERS
    for name in STAGES:
        api = json.loads((project_copy / "build" / "api" / "pipelines" / name).read_text())
        names = {n["full_name"] for n in api["nodes"] if n["type"] == "task"}
        assert names == expected_nodes(name), name


def test_the_generated_catalog_mirrors_every_entry_the_generated_pipeline_writes():
    """conf/base/catalog_generated.yml is what scripts/generated_catalog.py writes from catalog.yml
    (rerun it after changing either), and every dataset `--pipelines=generated` writes under its
    namespace has an entry there (none falls back to memory, none writes where __default__ does)."""
    import importlib.util

    from helpers import ROOT

    spec = importlib.util.spec_from_file_location("generated_catalog", ROOT / "scripts" / "generated_catalog.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--check"]) == 0
    patterns = [k for k in yaml_keys(ROOT / "conf/base/catalog_generated.yml")]
    missing = sorted(n for n in script.needed_names() if not any(script._matches(k, n) or k == n for k in patterns)
                     and n not in yaml_keys(ROOT / "conf/base/catalog.yml"))
    assert not missing, missing


def yaml_keys(path: Path) -> list[str]:
    import yaml

    return list(yaml.safe_load(path.read_text()))
