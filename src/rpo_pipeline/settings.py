"""Project settings (Kedro defaults; kedro-mlflow registers its hook through its entry point)."""

from rpo_pipeline.hooks import ValidateParameters

HOOKS = (ValidateParameters(),)

CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
}
