"""Process locks: one ``kedro run`` per project at a time, and a serialized MLflow SQLite set-up.

Kedro-free. Both use ``fcntl.flock`` on a lock file: the operating system releases the lock when
the holder exits, killed or not, so a crash never leaves a stale lock behind (POSIX only).

* ``RunLock``: a run takes it before it opens an MLflow run or runs a node. A second run in the
  same project fails at once with ``RunLockedError`` naming the holder (pid, pipelines, start
  time): two runs would write the same files under ``data/`` and race on the MLflow store.
* ``prepare_sqlite_store``: creates or migrates the SQLite tracking store under a lock, so two
  processes starting on a fresh ``mlflow.db`` do not run its schema migrations at the same time
  (without it both fail with alembic errors such as "table _alembic_tmp_tags already exists").
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

RUN_LOCK_FILE = ".kedro_run.lock"


class RunLockedError(RuntimeError):
    """Another run holds the project's run lock."""


class RunLock:
    """An exclusive, non-blocking lock on ``path``; the holder's ``info`` is written into it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file: IO[str] | None = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def acquire(self, info: dict[str, Any]) -> None:
        if self._file is not None:  # a previous run in this process ended without releasing
            self.release()
        f = open(self.path, "a+")  # noqa: SIM115 (held open while the run lasts)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise RunLockedError(self._locked_message()) from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps(info))
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is None:
            return
        try:
            self._file.seek(0)
            self._file.truncate()
            fcntl.flock(self._file, fcntl.LOCK_UN)
        finally:
            self._file.close()
            self._file = None

    def _locked_message(self) -> str:
        try:
            holder = json.loads(self.path.read_text())
            who = (f"pid {holder['pid']}, pipelines {holder['pipelines']}, env {holder['env']}, "
                   f"started {holder['started']}")
        except (OSError, ValueError, KeyError):
            who = "its details could not be read"
        return (f"another `kedro run` is running in this project ({who}); lock file {self.path}. "
                "Two runs at once would write the same files under data/ and race on the MLflow "
                "store: wait for it to finish (or stop it) and run again, or run from a separate "
                "copy of the project.")


@contextmanager
def waiting_lock(path: str | Path, timeout: float):
    """An exclusive lock on ``path``, waiting at most ``timeout`` seconds (then ``TimeoutError``)."""
    with open(path, "a+") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"waited {timeout:.0f} s for the lock {path}; another process "
                                       "holds it") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def sqlite_path(uri: str, base: str | Path) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative paths from ``base``), else None."""
    parsed = urlparse(uri)
    if parsed.scheme != "sqlite":
        return None
    path = Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None
    if path is None or str(path) in ("", ":memory:"):
        return None
    return path if path.is_absolute() else Path(base) / path


def prepare_sqlite_store(uri: str, base: str | Path, timeout: float = 120.0) -> None:
    """Create or migrate the SQLite tracking store at ``uri`` with no other process doing the same."""
    db = sqlite_path(uri, base)
    if db is None:
        return
    from mlflow import MlflowClient  # heavy; only for a SQLite store

    db.parent.mkdir(parents=True, exist_ok=True)
    with waiting_lock(f"{db}.lock", timeout):
        MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments(max_results=1)


def run_info(pipelines: Any, env: str | None) -> dict[str, Any]:
    return {"pid": os.getpid(), "pipelines": pipelines, "env": env or "local",
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
