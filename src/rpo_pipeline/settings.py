"""Project settings (kedro-mlflow registers its hook through its entry point)."""

from rpo_pipeline.hooks import SerializeRuns, TagRuns, ValidateParameters

# pluggy calls hooks of equal priority last-registered first: parameters are validated before the
# MLflow store is prepared, so a bad setting touches nothing.
HOOKS = (SerializeRuns(), ValidateParameters(), TagRuns())

def gpu_count() -> int:
    import torch  # only when a config uses ${gpu_count:}

    return max(1, torch.cuda.device_count())


CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # Parameters merge key by key across envs (Kedro's default replaces a whole top-level group):
    # an env states only what it changes, and a nested `--params a.b.c=v` with `--env` keeps a.b's
    # other keys (the destructive merge applies runtime params to the env's partial copy of `a`).
    "merge_strategy": {"parameters": "soft"},
    # ${gpu_count:} in a YAML value: the number of visible CUDA devices, at least 1 (conf/gpu)
    "custom_resolvers": {"gpu_count": gpu_count},
}
