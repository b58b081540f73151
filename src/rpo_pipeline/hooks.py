"""Project hooks: fail fast on configuration errors, one run per project at a time, and tags on
every MLflow run saying what it ran."""

from __future__ import annotations

import subprocess
from pathlib import Path

from kedro.config import MissingConfigException
from kedro.framework.hooks import hook_impl

from rpo_pipeline.locks import RUN_LOCK_FILE, RunLock, prepare_sqlite_store, run_info
from rpo_pipeline.params import GROUPS, POLICY_METHODS, ParameterError, validate_project_params
from rpo_pipeline.sources import unavailable_models


def stage_precisions(params: dict, groups: set[str]) -> dict[str, str]:
    """The precision each stage of ``groups`` resolves to on this machine: ``{"dpo.train":
    "fp32", "evaluation": "fp32", ...}``, one entry per ``precision`` key under a group, resolved
    on the group's ``device`` (``unresolved`` for a CUDA device on a machine without one: its
    stage fails on the device, not on the precision)."""
    import torch  # torch and the ML core: imported once a run starts, not by every kedro command

    from rpo_pipeline.precision import resolve_precision
    from rpo_pipeline.training import resolve_device

    out: dict[str, str] = {}

    def walk(node: dict, key: str, device: str) -> None:
        if "precision" in node:
            dev = resolve_device(device)
            if dev.type == "cuda" and not torch.cuda.is_available():
                out[key] = "unresolved"
                return
            try:
                out[key] = resolve_precision(node["precision"], dev)
            except ValueError as e:  # e.g. fp16 on a CPU: name the key, before any node runs
                raise ValueError(f"{key}.{e}") from None
        for name, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{key}.{name}", device)

    for group in sorted(groups):
        if isinstance(params.get(group), dict):
            walk(params[group], group, params[group].get("device", "auto"))
    return out


class ValidateParameters:
    """Check every parameter group (``rpo_pipeline.params``) when the Kedro context is created,
    that every stage's precision can run on its device (``stage_precisions``) and that every model
    named by a Hub id is in the local cache or the Hub is reachable (``sources.unavailable_models``).

    The parameters checked are the merged ones (``conf/base`` + ``--env`` + ``--params``), so a bad
    override fails in seconds with every problem listed, instead of minutes into a run. ``tryfirst``
    puts it before kedro-mlflow's hook, so a bad configuration touches no MLflow store either.
    """

    @hook_impl(tryfirst=True)
    def after_context_created(self, context) -> None:
        loader = context.config_loader
        sources = ["conf/base"] + ([f"conf/{context.env}"] if context.env else [])
        if loader.runtime_params:
            sources.append("--params")
        validate_project_params(loader["parameters"], source=" + ".join(sources))
        stage_precisions(loader["parameters"], set(GROUPS))  # e.g. fp16 on a CPU: refused here
        missing = unavailable_models(loader["parameters"])  # a Hub id neither cached nor reachable
        if missing:
            raise ParameterError("; ".join(missing))
        # the pipelines import the ML core (torch): only once a context exists, not per kedro command
        from rpo_pipeline.pipeline_registry import configure_run_shape

        configure_run_shape(loader["parameters"])  # rounds, refresh and judge shape the DAG


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
    (the Kedro env: the data and hardware configuration), ``mlflow.source.git.commit``, and what
    decides the last digits of the numbers: ``rpo_pipeline.precision`` (the precisions its stages
    resolve to, e.g. ``fp32``), ``rpo_pipeline.cpu_capability`` (torch's CPU kernels: ``AVX2``,
    ``AVX512``, ...) and ``rpo_pipeline.cpu_bf16`` (native bf16 instructions, or ``none``)."""

    @hook_impl(trylast=True)
    def before_pipeline_run(self, run_params, pipeline, catalog) -> None:
        import mlflow  # imported once a run starts, not by every kedro command
        import torch

        from rpo_pipeline.precision import device_facts  # torch: imported once a run starts

        if mlflow.active_run() is None:  # tracking disabled for this pipeline
            return
        nodes = [n.name for n in pipeline.nodes]
        methods = [m for m in POLICY_METHODS if any(n.startswith(f"{m}.") for n in nodes)]
        groups = {i.removeprefix("params:").split(".")[0] for n in pipeline.nodes for i in n.inputs
                  if i.startswith("params:")}
        precisions = stage_precisions(catalog.load("parameters"), groups)
        facts = device_facts(torch.device("cpu"))
        project = Path(run_params.get("project_path") or Path.cwd())
        mlflow.set_tags({"rpo_pipeline.pipelines": ",".join(run_params.get("pipeline_names")
                                                            or ["__default__"]),
                         "rpo_pipeline.methods": ",".join(methods) or "none",
                         "rpo_pipeline.env": run_params.get("env") or "local",
                         "rpo_pipeline.precision": ",".join(sorted(set(precisions.values()))) or "none",
                         "rpo_pipeline.cpu_capability": facts.cpu_capability,
                         "rpo_pipeline.cpu_bf16": ",".join(facts.cpu_bf16_flags) or "none",
                         "mlflow.source.git.commit": git_commit(project)})
