"""The trained policies and the reward model as registered MLflow Models (the shared tiny run's,
``tiny_run``): one test per concern: the registry, pyfunc loading offline, serving, the notebook,
and a registered model seeding the next run."""

from __future__ import annotations

import contextlib
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from rpo_pipeline.mlflow_models import POLICY, ModelBundle

NAMES = ["rpo_pipeline.dpo_policy", "rpo_pipeline.reward_model", "rpo_pipeline.rpo_online_policy",
         "rpo_pipeline.rpo_policy"]


def test_bundle_names_the_missing_artifact():
    with pytest.raises(ValueError, match=r"needs artifacts \['tokenizer'\]"):
        ModelBundle(POLICY, {"policy": "x"}, {})
    with pytest.raises(ValueError, match="kind must be one of"):
        ModelBundle("critic", {}, {})


def test_registry_holds_every_policy_and_the_reward_model_tagged_with_the_run(tiny_run):
    """One version each, tagged with its run and its metrics."""
    import mlflow

    client = mlflow.MlflowClient()
    assert sorted(m.name for m in client.search_registered_models()) == NAMES
    for name in NAMES:
        (version,) = client.search_model_versions(f"name='{name}'")
        assert version.tags["run_id"] == tiny_run.run.info.run_id, name
    (dpo,) = client.search_model_versions("name='rpo_pipeline.dpo_policy'")
    assert float(dpo.tags["evaluation.gold_reward_mean"]) == pytest.approx(
        tiny_run.metrics["evaluation.dpo.gold_reward_mean"], rel=1e-5)
    (rm,) = client.search_model_versions("name='rpo_pipeline.reward_model'")
    assert 0 <= float(rm.tags["reward_model.val_accuracy"]) <= 1


@contextlib.contextmanager
def data_moved_away(project, where):
    """The project's data folder moved to ``where`` for the block, and back afterwards."""
    shutil.move(project / "data", where)
    try:
        yield where
    finally:
        shutil.move(where, project / "data")


def test_registered_models_load_offline_and_reproduce_the_pipeline(tiny_run, tmp_path):
    """Loaded by name through mlflow.pyfunc with the project's data folder gone, a policy
    reproduces its own evaluation samples (same prompts, seed and settings) and differs from the
    reference's; the reward model's scores equal the pipeline's reward_scores."""
    import mlflow
    from transformers import AutoTokenizer

    data = tiny_run.project / "data"
    groups = pd.read_parquet(data / "03_primary/preference_groups.parquet").set_index("group_id")
    samples = {p: pd.read_parquet(data / f"07_model_output/evaluation/samples_{p}.parquet")
               for p in ("dpo", "rpo", "rpo_online", "reference")}
    scores = pd.read_parquet(data / "07_model_output/reward_scores.parquet").head(12)
    tok = AutoTokenizer.from_pretrained(data / "06_models/tokenizer")
    prompts_n = tiny_run.params["evaluation.max_prompts"]
    n_samples = tiny_run.params["evaluation.sampling.n_samples"]

    with data_moved_away(tiny_run.project, tmp_path / "moved"):  # the models must not need it
        order = list(dict.fromkeys(samples["dpo"]["group_id"]))
        prompts = pd.DataFrame({"prompt": groups.loc[order, "prompt"].tolist()})
        policy = mlflow.pyfunc.load_model("models:/rpo_pipeline.dpo_policy/latest")
        out = policy.predict(prompts)
        assert list(out.columns) == ["prompt", "sample", "completion"] and len(out) == prompts_n * n_samples

        def texts(table):  # the evaluation's sampled completions, decoded as the pyfunc decodes
            s = table[table["sample"] >= 0].sort_values(["group_id", "sample"])
            s = s.set_index("group_id").loc[order].reset_index()
            return [tok.decode(list(c), skip_special_tokens=True).strip() for c in s["completion_ids"]]

        assert out["completion"].tolist() == texts(samples["dpo"])
        assert out["completion"].tolist() != texts(samples["reference"])
        for name in ("rpo", "rpo_online"):  # every registered policy reproduces its own samples
            got = mlflow.pyfunc.load_model(f"models:/rpo_pipeline.{name}_policy/1").predict(prompts)
            assert got["completion"].tolist() == texts(samples[name]), name
        longer = policy.predict(prompts.head(2), params={"n_samples": 3, "seed": 5})
        assert len(longer) == 6 and longer["sample"].tolist() == [0, 1, 2, 0, 1, 2]

        reward = mlflow.pyfunc.load_model("models:/rpo_pipeline.reward_model/latest")
        rows = pd.DataFrame({"prompt": groups.loc[scores["group_id"], "prompt"].tolist(),
                             "response": [groups.loc[g, "responses"][k] for g, k in
                                          zip(scores["group_id"], scores["response_index"], strict=True)]})
        got = reward.predict(rows)
        assert list(got.columns) == ["score", "score_std"]  # one model: its score, no spread
        np.testing.assert_allclose(got["score"].to_numpy(), scores["reward"].to_numpy(), atol=1e-4)
        assert (got["score_std"] == 0).all()


def test_a_registered_policy_is_served_over_http(tiny_run, processes):
    """`mlflow models serve` as the README says, offline: one request."""
    groups = pd.read_parquet(tiny_run.project / "data/03_primary/preference_groups.parquet")
    _serve_one_request(tiny_run.project, groups[["prompt"]].head(2), processes)


def test_the_notebook_runs_against_the_run(tiny_run, monkeypatch):
    _run_notebook(tiny_run.project, monkeypatch)


def test_a_registered_model_seeds_the_next_run(tiny_run, tiny_run_copy):
    """Base model and reward-model backbone by models:/ URI, in a copy of the run's project (its
    own store, so the shared run's registry is left as it was)."""
    from helpers import mlflow_runs, run_kedro

    project = tiny_run_copy
    data = project / "data"
    dpo_weights = (data / "06_models/dpo_policy/model.safetensors").read_bytes()
    run_kedro(project, ["reward_model"], runtime_params={
        **tiny_run.params, "base_model.name_or_path": "models:/rpo_pipeline.dpo_policy/latest",
        "reward_model.backbone": "models:/rpo_pipeline.dpo_policy/1"})
    # each source resolved by its catalog entry: pinned to version 1, downloaded into its folder
    base = data / "06_models/sources/base_model/rpo_pipeline.dpo_policy/v1"
    backbone = data / "06_models/sources/reward_model_backbone/rpo_pipeline.dpo_policy/v1"
    assert (base / "model.safetensors").read_bytes() == dpo_weights
    assert (backbone / "model.safetensors").read_bytes() == dpo_weights
    assert (data / "06_models/base_model/model.safetensors").read_bytes() == dpo_weights
    config = (data / "06_models/reward_model/reward_model.json").read_text()
    assert f'"backbone_path": "{backbone}"' in config
    source = json.loads((data / "06_models/sources/base_model/source.json").read_text())
    assert source == {"requested": "models:/rpo_pipeline.dpo_policy/latest",
                      "resolved": "models:/rpo_pipeline.dpo_policy/1", "path": str(base)}
    tags = mlflow_runs(project)[0].data.tags  # the resolved version, logged with the run
    assert tags["rpo_pipeline.source.base_model.name_or_path"] == "models:/rpo_pipeline.dpo_policy/1"


def _serve_one_request(project, prompts: pd.DataFrame, processes) -> None:
    """`mlflow models serve -m models:/rpo_pipeline.rpo_policy/latest --env-manager local`, one
    /invocations request with params, the server stopped."""
    import json
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
           "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    server = processes.popen([sys.executable, "-m", "mlflow", "models", "serve", "-m",
                               "models:/rpo_pipeline.rpo_policy/latest", "--env-manager", "local",
                               "-h", "127.0.0.1", "-p", str(port)], cwd=project, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(240):
            try:
                urllib.request.urlopen(url + "/ping", timeout=1)
                break
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()[-2000:]
                time.sleep(0.5)
        body = json.dumps({"dataframe_split": {"columns": ["prompt"],
                                               "data": [[p] for p in prompts["prompt"]]},
                           "params": {"n_samples": 2, "max_new_tokens": 4}}).encode()
        req = urllib.request.Request(url + "/invocations", body, {"Content-Type": "application/json"})
        predictions = json.loads(urllib.request.urlopen(req, timeout=60).read())["predictions"]
        assert len(predictions) == 2 * len(prompts)
        assert [p["sample"] for p in predictions] == [0, 1] * len(prompts)
        assert all(isinstance(p["completion"], str) for p in predictions)
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def _run_notebook(project, monkeypatch) -> None:
    """notebooks/compare_policies.ipynb executed with nbclient: Kedro's IPython extension loads
    the catalog, the registered dpo policy generates; every cell runs without error."""
    import nbclient
    import nbformat
    from helpers import ROOT

    nb = nbformat.read(ROOT / "notebooks/compare_policies.ipynb", as_version=4)
    monkeypatch.setenv("RPO_PROJECT", str(project))
    monkeypatch.setenv("KEDRO_DISABLE_TELEMETRY", "1")
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(project)}}).execute()
    outputs = {i: c.get("outputs", []) for i, c in enumerate(nb.cells) if c.cell_type == "code"}
    last = outputs[max(outputs)][-1]["data"]["text/plain"]
    assert "completion" in last and "sample" in last  # the registered policy's completions
    assert any("image/png" in o.get("data", {}) for out in outputs.values() for o in out)
