"""Project pipelines.

Stages, in run order: ``data_processing`` -> ``reference`` -> ``reward_model`` -> ``dpo`` / ``rpo``
-> ``evaluation``. A stage appears here once its package exists under ``pipelines/``.
"""

from __future__ import annotations

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline


def register_pipelines() -> dict[str, Pipeline]:
    """Every pipeline under ``pipelines/`` by its folder name, and ``__default__`` = all of them."""
    pipelines = find_pipelines(raise_errors=True)
    pipelines["__default__"] = sum(pipelines.values())
    return pipelines
