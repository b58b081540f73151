"""Fixtures the tests share: offline, no telemetry, a throwaway copy of the project for Kedro
runs (``project_copy``). Plain helpers are in helpers.py."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers import DEFAULT_DATA, ROOT  # noqa: E402  (after the environment is set)


@pytest.fixture
def project_copy(tmp_path, monkeypatch) -> Path:
    """A copy of the project's conf/, raw data and pyproject.toml to run Kedro sessions in.

    The copy's MLflow store is its own mlflow.db, by absolute URI: mlflow caches stores by URI,
    so the relative ``sqlite:///mlflow.db`` would keep pointing at the first copy in this process.
    """
    dst = tmp_path / "project"
    shutil.copytree(ROOT / "conf", dst / "conf", ignore=shutil.ignore_patterns("credentials*"))
    (dst / "data" / "01_raw").mkdir(parents=True)
    shutil.copy(DEFAULT_DATA, dst / "data" / "01_raw")
    for layer in ("02_intermediate", "03_primary", "04_feature", "05_model_input", "06_models",
                  "07_model_output", "08_reporting"):
        (dst / "data" / layer).mkdir()
    shutil.copy(ROOT / "pyproject.toml", dst / "pyproject.toml")
    mlflow_yml = dst / "conf" / "base" / "mlflow.yml"
    mlflow_yml.write_text(mlflow_yml.read_text().replace(
        "sqlite:///mlflow.db", f"sqlite:///{dst / 'mlflow.db'}"))
    (dst / "src").mkdir()  # bootstrap_project wants it; the package itself is installed
    monkeypatch.chdir(dst)
    return dst

