"""Project hooks: fail fast on configuration errors, one run per project at a time, and tags on
every MLflow run saying what it ran."""

from __future__ import annotations

import subprocess
from pathlib import Path

from kedro.config import MissingConfigException
from kedro.framework.hooks import hook_impl

from rpo_pipeline.locks import RUN_LOCK_FILE, RunLock, prepare_sqlite_store, run_info


class ValidateParameters:
    """Check every parameter group (``rpo_pipeline.params``) when the Kedro context is created.

    The parameters checked are the merged ones (``conf/base`` + ``--env`` + ``--params``), so a bad
    override fails in seconds with every problem listed, instead of minutes into a run. ``tryfirst``
    puts it before kedro-mlflow's hook, so a bad configuration touches no MLflow store either.
    """

    @hook_impl(tryfirst=True)
    def after_context_created(self, context) -> None:
        from rpo_pipeline.params import validate_project_params  # heavy imports: only when used

        loader = context.config_loader
        sources = ["conf/base"] + ([f"conf/{context.env}"] if context.env else [])
        if loader.runtime_params:
            sources.append("--params")
        params = validate_project_params(loader["parameters"], source=" + ".join(sources))
        self._shape_the_dag(params.rpo_online.rounds, params.generate_preferences.judge)

    @staticmethod
    def _shape_the_dag(rounds: int, judge: str) -> None:
        """The registry unrolls ``rpo_online.rounds`` rounds (Kedro DAGs have no loops) and wires
        ``generate_preferences.judge``, so the pipelines are built from this run's values; built
        ones with other values are rebuilt."""
        from kedro.framework.project import pipelines

        from rpo_pipeline.pipeline_registry import set_run_shape

        if set_run_shape(rounds, judge):
            pipelines._is_data_loaded = False  # Kedro's lazy cache: rebuilt on next access


class SerializeRuns:
    """Concurrent ``kedro run`` in one project: one runs, the other fails at once (``locks``).

    * Context created: the SQLite tracking store is created / migrated under a file lock, before
      kedro-mlflow opens it, so two processes on a fresh ``mlflow.db`` do not migrate it at once.
    * Before the pipeline (and before kedro-mlflow starts its MLflow run): take the project's run
      lock, or fail naming the run that holds it. Released after the run, failed or not; the
      operating system releases it if the process dies.
    """

    def __init__(self) -> None:
        self._lock: RunLock | None = None

    @hook_impl(tryfirst=True)
    def after_context_created(self, context) -> None:
        loader = context.config_loader
        if "mlflow" not in loader.config_patterns:  # as kedro-mlflow registers it
            loader.config_patterns.update({"mlflow": ["mlflow*", "mlflow*/**", "**/mlflow*"]})
        try:
            uri = ((loader["mlflow"] or {}).get("server") or {}).get("mlflow_tracking_uri")
        except MissingConfigException:  # no mlflow.yml: kedro-mlflow's defaults (no SQLite)
            return
        if uri:
            prepare_sqlite_store(uri, Path.cwd())  # mlflow resolves relative sqlite paths from cwd

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self, run_params) -> None:
        if self._lock is not None:
            self._lock.release()
        project = Path(run_params.get("project_path") or Path.cwd())
        self._lock = RunLock(project / RUN_LOCK_FILE)
        self._lock.acquire(run_info(run_params.get("pipeline_names"), run_params.get("env")))

    @hook_impl(trylast=True)
    def after_pipeline_run(self) -> None:
        self._release()

    @hook_impl(trylast=True)
    def on_pipeline_error(self) -> None:
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def git_commit(project: Path) -> str:
    """The project's git commit (``-dirty`` when tracked files changed), or ``unknown``."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=project, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class TagRuns:
    """Tag the MLflow run that kedro-mlflow started (``trylast``: after its hook) with what it
    runs, for the MLflow UI's search and compare views: ``rpo_pipeline.pipelines`` (the
    ``--pipelines`` names), ``rpo_pipeline.methods`` (the policies it trains), ``rpo_pipeline.env``
    (the Kedro env: the data and hardware configuration) and ``mlflow.source.git.commit``."""

    @hook_impl(trylast=True)
    def before_pipeline_run(self, run_params, pipeline) -> None:
        import mlflow

        if mlflow.active_run() is None:  # tracking disabled for this pipeline
            return
        nodes = [n.name for n in pipeline.nodes]
        from rpo_pipeline.params import POLICY_METHODS

        methods = [m for m in POLICY_METHODS if any(n.startswith(f"{m}.") for n in nodes)]
        project = Path(run_params.get("project_path") or Path.cwd())
        mlflow.set_tags({"rpo_pipeline.pipelines": ",".join(run_params.get("pipeline_names")
                                                            or ["__default__"]),
                         "rpo_pipeline.methods": ",".join(methods) or "none",
                         "rpo_pipeline.env": run_params.get("env") or "local",
                         "mlflow.source.git.commit": git_commit(project)})
