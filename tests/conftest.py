"""Fixtures the tests share: offline, no telemetry, a throwaway copy of the project for Kedro
runs (``project_copy``), one tiny evaluation run shared by the tests that only read its outputs
(``tiny_run``), and ``processes`` for tests that start other processes. Plain helpers are in
helpers.py.

``slow`` is not marked by hand: a test is slow when it uses a fixture of ``SLOW_FIXTURES`` (a
whole Kedro pipeline, a subprocess `kedro`, a server, a notebook kernel or several worker
processes). ``make test`` runs the rest (``-m "not slow"``); there, starting a process fails the
test with a pointer to ``processes``, so the split cannot drift.
"""

from __future__ import annotations

import multiprocessing.process
import os
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers import (  # noqa: E402  (after the environment is set)
    DEFAULT_DATA,
    ROOT,
    TINY_ONLINE,
    TINY_RUN,
    mlflow_runs,
    run_kedro,
)

# a test that uses one of these is marked slow
SLOW_FIXTURES = {"project_copy", "tiny_run", "processes"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


# programs whose start makes a test slow: Python (workers, servers, notebook kernels, scripts)
# and the Kedro and MLflow command lines; small helpers (git, uname, fc-list) are fine
SLOW_PROGRAMS = re.compile(r"^(python[0-9.]*|kedro|mlflow)$")


@pytest.fixture(autouse=True)
def _no_process_outside_slow_tests(request, monkeypatch):
    """A test not marked slow may not start a Python, `kedro` or `mlflow` process, nor a
    multiprocessing worker: the fast set stays fast by construction."""
    if request.node.get_closest_marker("slow"):
        return
    popen_init, process_start = subprocess.Popen.__init__, multiprocessing.process.BaseProcess.start

    def refuse(what):
        raise RuntimeError(f"{request.node.nodeid} starts {what}: request the `processes` fixture "
                           "(it marks the test slow)")

    def guarded_init(self, args, *rest, **kwargs):
        program = args if isinstance(args, str | os.PathLike) else args[0]
        if SLOW_PROGRAMS.match(Path(str(program).split()[0]).name):
            refuse(f"`{program}`")
        popen_init(self, args, *rest, **kwargs)

    def guarded_start(self):
        refuse("a worker process")
        process_start(self)

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded_init)
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", guarded_start)


@pytest.fixture
def processes():
    """For a test that starts processes (subprocesses, ``run_workers``): ``processes.run`` and
    ``processes.popen`` are ``subprocess.run`` / ``Popen`` with the project's environment; after
    the test no child process may be left running."""
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1"}

    def run(cmd, **kwargs):
        return subprocess.run(cmd, env=kwargs.pop("env", env), **kwargs)

    def popen(cmd, **kwargs):
        return subprocess.Popen(cmd, env=kwargs.pop("env", env), **kwargs)

    yield SimpleNamespace(run=run, popen=popen, env=env)
    left = [p for p in multiprocessing.active_children() if p.is_alive()]
    assert not left, f"child processes still running after the test: {left}"


def _copy_project(dst: Path) -> Path:
    """conf/, the raw data and pyproject.toml under ``dst``, with its own MLflow store (by
    absolute URI: mlflow caches stores by URI, so the relative ``sqlite:///mlflow.db`` would keep
    pointing at the first copy in this process)."""
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
    return dst


@pytest.fixture
def project_copy(tmp_path, monkeypatch) -> Path:
    """A copy of the project's conf/, raw data and pyproject.toml to run Kedro sessions in."""
    dst = _copy_project(tmp_path / "project")
    monkeypatch.chdir(dst)
    return dst


# the shared tiny run: every stage at toy sizes, so that its outputs exercise every code path
TINY_EVALUATION = {
    **TINY_RUN, "reward_model.train.steps": 2, "reward_model.train.progress": False,
    "reward_model.device": "cpu", "reward_model.score.batch_size": 256,
    "dpo.train.steps": 4, "dpo.train.lr": 0.05, "dpo.train.eval_every": 2, "dpo.train.log_every": 2,
    "dpo.train.progress": False, "dpo.device": "cpu",
    "rpo.train.steps": 4, "rpo.train.eval_every": 2, "rpo.train.log_every": 2,
    "rpo.train.progress": False, "rpo.device": "cpu",
    **TINY_ONLINE, "rpo_online.rounds": 3,
    "evaluation.max_prompts": 6, "evaluation.sampling.n_samples": 2,
    "evaluation.sampling.max_new_tokens": 6, "evaluation.progress": False, "evaluation.device": "cpu",
    "evaluation.curve.prompts": 2}


@pytest.fixture(scope="session")
def _tiny_run_once(tmp_path_factory):
    project = _copy_project(tmp_path_factory.mktemp("tiny_run") / "project")
    cwd = Path.cwd()
    os.chdir(project)
    try:
        run_kedro(project, ["evaluation"], runtime_params=TINY_EVALUATION)
    finally:
        os.chdir(cwd)
    run = mlflow_runs(project)[0]
    assert run.info.status == "FINISHED"
    return SimpleNamespace(project=project, run=run, metrics=run.data.metrics,
                           params=dict(TINY_EVALUATION), uri=f"sqlite:///{project / 'mlflow.db'}")


@pytest.fixture
def tiny_run(_tiny_run_once):
    """One tiny `kedro run --pipelines=evaluation` (``TINY_EVALUATION``: every stage, 3 online
    rounds, 6 prompts x 2 samples) for the whole test session, with MLflow pointed at its store.
    Tests read its outputs and must leave them as they found them: ``project`` (the folder),
    ``run`` (its MLflow run), ``metrics``, ``params``, ``uri`` (the tracking URI)."""
    import mlflow
    from helpers import end_stale_runs

    end_stale_runs()
    mlflow.set_tracking_uri(_tiny_run_once.uri)
    return _tiny_run_once


@pytest.fixture
def tiny_run_copy(tiny_run, tmp_path, monkeypatch) -> Path:
    """A copy of the tiny run's project with its own MLflow store (so the shared run's outputs and
    registry stay as they were), as the working directory."""
    project = tmp_path / "project"
    shutil.copytree(tiny_run.project, project)
    mlflow_yml = project / "conf" / "base" / "mlflow.yml"
    mlflow_yml.write_text(mlflow_yml.read_text().replace(str(tiny_run.project / "mlflow.db"),
                                                         str(project / "mlflow.db")))
    monkeypatch.chdir(project)
    return project
