"""Project settings (Kedro defaults; kedro-mlflow registers its hook through its entry point)."""

CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
}
