"""Helpers the tests share (imported as ``from helpers import ...``; fixtures are in conftest.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (ROOT.parent / "shared" / "data").resolve()
DEFAULT_DATA = ROOT / "data" / "01_raw" / "sentiment_reviews.jsonl"


def base_params(group: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Parameter group ``group`` as conf/base defines it (the only source of defaults), with
    dotted-key ``overrides`` applied like ``--params`` (``{"train.steps": 3}``)."""
    from rpo_pipeline.params import base_parameters

    params = base_parameters(group, ROOT / "conf")
    for block in (params.get("train"), params.get("sft")):
        if isinstance(block, dict) and "precision" in block:
            block["precision"] = "fp32"  # exactness checks assume fp32 (auto: test_precision.py)
    for key, value in (overrides or {}).items():
        *parents, leaf = key.split(".")
        node = params
        for p in parents:
            node = node[p]
        node[leaf] = value
    return params


def train_config(**overrides: Any):
    """A ``TrainConfig`` for unit tests: conf/base's ``reward_model.train`` block (plain training:
    no evaluation, checkpoints or autocast) on the CPU without a progress bar, plus ``overrides``."""
    from rpo_pipeline.training import LOOP_FEATURES_OFF, TrainConfig

    return TrainConfig(**{**LOOP_FEATURES_OFF, **base_params("reward_model")["train"], "device": "cpu",
                          "progress": False, **overrides})


class TableLM(torch.nn.Module):
    """A scorer (``scoring.ResponseLogps``'s interface) whose next-token logits are a learnable
    table: log p(y_t | ..., y_{t-1}) = log_softmax(table[y_{t-1}])[y_t] (log-probs easy to control).
    Takes ``scoring.packed_collate`` batches; returns summed response log-probs and counts."""

    def __init__(self, vocab: int = 6):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.randn(vocab, vocab))

    def forward(self, batch):
        prev, y, rows = batch["packed_ids"][0][batch["score_from"]], batch["score_target"], batch["score_row"]
        lp = torch.log_softmax(self.logits[prev], -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
        n = int(batch["n_rows"])
        return (torch.zeros(n, dtype=torch.float64).index_add(0, rows, lp.double()),
                torch.zeros(n, dtype=torch.long).index_add(0, rows, torch.ones_like(rows)))


def shared_file(relative: str) -> Path:
    """A file under ../shared/data, or skip the test (the folder is absent outside this workspace)."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"../shared/data/{relative} is not present (public sample data beside the repo)")
    return path


def nest_params(dotted: dict[str, Any] | None) -> dict[str, Any]:
    """``{"a.b": v}`` -> ``{"a": {"b": v}}``, as ``kedro run --params a.b=v`` passes them."""
    nested: dict[str, Any] = {}
    for key, value in (dotted or {}).items():
        *parents, leaf = key.split(".")
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nested


# toy sizes for pipeline tests (a 1-layer model, 3 SFT steps; online: 8 prompts, 2 steps a round)
TINY_RUN = {"base_model.model.n_layer": 1, "base_model.model.n_embd": 32, "base_model.model.n_head": 2,
            "reference.sft.steps": 3, "reference.sft.progress": False, "reference.device": "cpu"}
TINY_ONLINE = {"rpo_online.prompts_per_round": 8, "rpo_online.sampling.n_samples": 2,
               "rpo_online.sampling.max_new_tokens": 6, "rpo_online.train.steps": 2,
               "rpo_online.train.batch_size": 4, "rpo_online.train.progress": False,
               "rpo_online.device": "cpu"}


def end_stale_runs() -> None:
    """End the MLflow run an earlier in-process Kedro session left active; call it before the
    tracking URI changes (the run is ended in the store it belongs to)."""
    import mlflow

    while mlflow.active_run():
        mlflow.end_run()


def run_kedro(project: Path, pipelines: list[str], env: str | None = None,
              runtime_params: dict | None = None) -> dict:
    """Run pipelines in-process like `kedro run --pipelines=... --env=... --params=a.b=v,...`."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    end_stale_runs()
    bootstrap_project(project)
    with KedroSession.create(project_path=project, env=env,
                             runtime_params=nest_params(runtime_params)) as s:
        return s.run(pipeline_names=pipelines)


def mlflow_runs(project: Path):
    """All runs of the experiment `rpo_pipeline` in the project's SQLite store, newest first."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["rpo_pipeline"], output_format="list")


def kedro_env(project: Path, name: str, like: str | None = None,
              catalog: dict[str, dict[str, Any]] | None = None) -> str:
    """A temporary Kedro env ``conf/<name>`` in a project copy: the files of ``conf/<like>`` (if
    given), with ``catalog`` entries merged key by key into its catalog.yml. Returns ``name`` for
    ``run_kedro(..., env=name)``."""
    env = project / "conf" / name
    if like is not None:
        shutil.copytree(project / "conf" / like, env)
    env.mkdir(parents=True, exist_ok=True)
    path = env / "catalog.yml"
    entries = (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}
    for key, fields in (catalog or {}).items():
        entries[key] = {**entries.get(key, {}), **fields}
    path.write_text(yaml.safe_dump(entries, sort_keys=False))
    return name


# ---- small preference files (tests of reading and validation) -------------------------------------
PAIRS = [{"prompt": f"prompt {i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(40)]


def jsonl(rows: list[dict]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def write_file(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def load(path: Path | str, on_invalid: str = "raise"):
    """Read and ingest a preference file, as the data_processing pipeline does."""
    from rpo_pipeline.datasets import read_preference_files
    from rpo_pipeline.preference_groups import ingest

    return ingest(read_preference_files(str(path)), on_invalid=on_invalid)


def fails(path: Path | str, on_invalid: str = "raise") -> str:
    """The message of the ``PreferenceDataError`` that reading ``path`` raises."""
    from rpo_pipeline.preference_formats import PreferenceDataError

    with pytest.raises(PreferenceDataError) as e:
        load(path, on_invalid)
    return str(e.value)


def checkpoint_step(out: Path) -> int:
    """The step of the last checkpoint under ``out/ckpt`` (0 while there is none yet)."""
    from rpo_pipeline.training import CHECKPOINT_STATE

    try:
        return json.loads((out / "ckpt" / "last" / CHECKPOINT_STATE).read_text())["step"]
    except (OSError, ValueError):
        return 0
