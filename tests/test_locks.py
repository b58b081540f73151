"""Two `kedro run` at once in one project: one runs, the other fails fast with a clear message; the
MLflow SQLite store is never corrupted, never hangs, and the first run's data is kept."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import mlflow_runs

from rpo_pipeline.locks import RUN_LOCK_FILE, RunLock, RunLockedError, prepare_sqlite_store, run_info

KEDRO = shutil.which("kedro", path=str(Path(sys.executable).parent)) or "kedro"
ENV = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "1"}


def test_run_lock_is_exclusive_names_the_holder_and_is_released(tmp_path):
    first, second = RunLock(tmp_path / "l"), RunLock(tmp_path / "l")
    first.acquire(run_info(["dpo"], None))
    with pytest.raises(RunLockedError, match=rf"another `kedro run` is running in this project \(pid "
                                             rf"{os.getpid()}, pipelines \['dpo'\], env local, started "):
        second.acquire(run_info(["rpo"], None))
    first.release()
    second.acquire(run_info(["rpo"], "hh_rlhf"))
    assert second.held
    second.release()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path, processes):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from rpo_pipeline.locks import RunLock, run_info; "
        f"lock = RunLock({str(tmp_path / 'l')!r}); lock.acquire(run_info(['dpo'], None)); "
        "print('held', flush=True); "
        "time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunLockedError, match=rf"pid {holder.pid}"):
        RunLock(tmp_path / "l").acquire(run_info(["rpo"], None))
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lock = RunLock(tmp_path / "l")
    lock.acquire(run_info(["rpo"], None))  # the OS released it with the process
    lock.release()


def test_store_preparation_is_serialized_and_idempotent(tmp_path):
    uri = "sqlite:///store/mlflow.db"
    prepare_sqlite_store(uri, tmp_path)
    prepare_sqlite_store(uri, tmp_path)
    assert (tmp_path / "store" / "mlflow.db").stat().st_size > 0
    prepare_sqlite_store("http://localhost:5000", tmp_path)  # not SQLite: nothing to do


def _kedro_run(project: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([KEDRO, "run", "--pipelines=data_processing", *args], cwd=project, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_second_run_fails_fast_while_one_holds_the_project(project_copy):
    holder = RunLock(project_copy / RUN_LOCK_FILE)
    holder.acquire(run_info(["evaluation"], None))  # stands for a long run in progress
    try:
        t0 = time.perf_counter()
        proc = _kedro_run(project_copy)
        out, _ = proc.communicate(timeout=120)
        seconds = time.perf_counter() - t0
    finally:
        holder.release()
    assert proc.returncode != 0
    text = " ".join(out.split())
    assert f"another `kedro run` is running in this project (pid {os.getpid()}, pipelines ['evaluation']" in text
    assert seconds < 60, seconds  # start-up, then out: no node, no waiting
    assert not any((project_copy / "data" / "02_intermediate").iterdir())
    assert mlflow_runs(project_copy) == []  # no MLflow run was opened for it

    done = _kedro_run(project_copy)  # the lock is free again
    assert done.wait(timeout=300) == 0, done.stdout.read()[-3000:]


def test_two_concurrent_runs_on_a_fresh_store(project_copy):
    """Started together on a fresh mlflow.db: no schema-migration race, no hang, nothing lost."""
    procs = [_kedro_run(project_copy) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]  # a hang fails here
    codes = [p.returncode for p in procs]
    for code, out in zip(codes, outs, strict=True):
        assert "alembic" not in out and "already exists" not in out, out[-3000:]
        assert code == 0 or "another `kedro run` is running in this project" in " ".join(out.split()), out[-3000:]
    assert 0 in codes
    runs = mlflow_runs(project_copy)
    assert len(runs) == codes.count(0)  # one MLflow run per run that ran, none for one locked out
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.metrics["data_processing.rows_in"] == 2550
    assert (project_copy / "data/05_model_input/tokenized_examples.parquet").exists()
