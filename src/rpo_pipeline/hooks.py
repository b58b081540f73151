"""Project hooks: fail fast on configuration errors, before any node runs or any model loads."""

from __future__ import annotations

from kedro.framework.hooks import hook_impl


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
        validate_project_params(loader["parameters"], source=" + ".join(sources))
