"""Parameter schemas: every rule, checked when the Kedro context is created (``--params`` included),
with the full key path, the value and what is allowed; ``--env`` + nested ``--params`` keep siblings."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT, base_params, nest_params

from rpo_pipeline.params import GROUPS, DpoParams, ParameterError, validate_project_params

ENVS = sorted(p.name for p in (ROOT / "conf").iterdir() if p.is_dir() and p.name not in ("base", "local"))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The project's conf/ (no data: creating a context reads configuration only)."""
    dst = tmp_path_factory.mktemp("params") / "project"
    shutil.copytree(ROOT / "conf", dst / "conf")
    shutil.copy(ROOT / "pyproject.toml", dst / "pyproject.toml")
    (dst / "src").mkdir()
    mlflow_yml = dst / "conf" / "base" / "mlflow.yml"  # its own store, not the checkout's mlflow.db
    mlflow_yml.write_text(mlflow_yml.read_text().replace("sqlite:///mlflow.db", f"sqlite:///{dst / 'mlflow.db'}"))
    return dst


def context_params(project: Path, runtime: dict | None = None, env: str | None = None) -> dict:
    """Create the Kedro context like `kedro run --env=<env> --params=<runtime>` (the hooks run, so
    ``ValidateParameters`` checks them); its parameters."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(project)
    with KedroSession.create(project_path=project, env=env, runtime_params=nest_params(runtime)) as s:
        return s.load_context().params


def loaded_params(runtime: dict | None = None, env: str | None = None) -> dict:
    """The merged parameters as the project's config loader builds them (settings.py: the same
    loader arguments), without a Kedro session."""
    from kedro.config import OmegaConfigLoader

    from rpo_pipeline.settings import CONFIG_LOADER_ARGS

    loader = OmegaConfigLoader(conf_source=str(ROOT / "conf"), env=env,
                               runtime_params=nest_params(runtime), **CONFIG_LOADER_ARGS)
    return loader["parameters"]


def validation_error(runtime: dict, env: str | None = None) -> str:
    """The validator's message for these settings, with the sources the hook names."""
    source = " + ".join(["conf/base", *([f"conf/{env}"] if env else []), *(["--params"] if runtime else [])])
    with pytest.raises(ParameterError) as e:
        validate_project_params(loaded_params(runtime, env), source=source)
    return str(e.value)


def context_error(project: Path, runtime: dict, env: str | None = None) -> str:
    with pytest.raises(ParameterError) as e:
        context_params(project, runtime, env)
    return str(e.value)


# (--params overrides, the line the user gets). One rule per case; each must be the only problem.
RULES = [
    # ranges: β > 0, η > 0, 0 <= label_smoothing < 0.5
    ({"dpo.beta": -1}, "dpo.beta = -1: must be greater than 0"),
    ({"rpo.beta": 0}, "rpo.beta = 0: must be greater than 0"),
    ({"rpo.eta": 0.0}, "rpo.eta = 0.0: must be greater than 0"),
    ({"dpo.label_smoothing": 0.5}, "dpo.label_smoothing = 0.5: must be less than 0.5"),
    ({"dpo.label_smoothing": -0.1}, "dpo.label_smoothing = -0.1: must be greater than or equal to 0"),
    # lr > 0, steps >= 0, batch sizes >= 1
    ({"dpo.train.lr": 0}, "dpo.train.lr = 0: must be greater than 0"),
    ({"reference.sft.lr": -1.0}, "reference.sft.lr = -1.0: must be greater than 0"),
    ({"reward_model.train.steps": -1}, "reward_model.train.steps = -1: must be greater than or equal to 0"),
    ({"rpo.train.batch_size": 0}, "rpo.train.batch_size = 0: must be greater than or equal to 1"),
    ({"dpo.train.batch_size": 2, "dpo.train.num_processes": 3},
     "dpo.train.batch_size = 2 is smaller than num_processes = 3: batch_size is the global batch"),
    ({"reference.logprobs.batch_size": 0}, "reference.logprobs.batch_size = 0: must be greater than or equal"),
    ({"reward_model.score.batch_size": 0}, "reward_model.score.batch_size = 0: must be greater than or equal"),
    ({"evaluation.batch_size": 0}, "evaluation.batch_size = 0: must be greater than or equal to 1"),
    ({"evaluation.sampling.batch_size": 0}, "evaluation.sampling.batch_size = 0: must be greater than or"),
    ({"dpo.train.grad_accum": 0}, "dpo.train.grad_accum = 0: must be greater than or equal to 1"),
    ({"dpo.train.max_grad_norm": 0}, "dpo.train.max_grad_norm = 0: must be greater than 0"),
    ({"dpo.train.warmup_steps": -1}, "dpo.train.warmup_steps = -1: must be greater than or equal to 0"),
    ({"rpo.train.weight_decay": -0.1}, "rpo.train.weight_decay = -0.1: must be greater than or equal to 0"),
    ({"reference.sft.log_every": 0}, "reference.sft.log_every = 0: must be greater than or equal to 1"),
    ({"dpo.train.eval_every": -1}, "dpo.train.eval_every = -1: must be greater than or equal to 0"),
    ({"rpo.train.checkpoint_every": -2}, "rpo.train.checkpoint_every = -2: must be greater than or equal"),
    ({"dpo.sft_weight": -1.0}, "dpo.sft_weight = -1.0: must be greater than or equal to 0"),
    ({"reward_model.center_coef": -0.5}, "reward_model.center_coef = -0.5: must be greater than or equal"),
    ({"dpo.lora.dropout": 1.0}, "dpo.lora.dropout = 1.0: must be less than 1"),
    ({"dpo.lora.r": 0}, "dpo.lora.r = 0: must be greater than or equal to 1"),
    ({"reward_model.lora.target_modules": []}, "reward_model.lora.target_modules = []: must be 'auto' (the "
                                               "architecture's projections), 'all-linear', or a non-empty list"),
    ({"dpo.lora.target_modules": "attention"}, "dpo.lora.target_modules = 'attention': must be 'auto'"),
    ({"evaluation.max_prompts": 0}, "evaluation.max_prompts = 0: must be greater than or equal to 1"),
    ({"evaluation.sampling.n_samples": 0}, "evaluation.sampling.n_samples = 0: must be greater than or equal"),
    ({"evaluation.sampling.max_new_tokens": 0}, "evaluation.sampling.max_new_tokens = 0: must be greater than"),
    ({"base_model.name_or_path": ""}, "base_model.name_or_path = '': String should have at least 1 character"),
    ({"data_processing.columns.prompt": ""}, "data_processing.columns.prompt = '': String should have at least"),
    # split fractions in [0, 1] summing to 1
    ({"data_processing.split.train": 1.2}, "data_processing.split.train = 1.2: must be less than or equal to 1"),
    ({"data_processing.split.val": -0.1}, "data_processing.split.val = -0.1: must be greater than or equal"),
    ({"data_processing.split.train": 0.7}, "data_processing.split fractions sum to 0.9; train + val + test must be 1"),
    # max_length > max_prompt_length
    ({"data_processing.max_length": 64},
     "data_processing.max_length = 64 must be greater than max_prompt_length = 64"),
    # sampling: temperature > 0, 0 < top_p <= 1, top_k an integer >= 0, not null
    ({"evaluation.sampling.temperature": 0}, "evaluation.sampling.temperature = 0: must be greater than 0"),
    ({"evaluation.sampling.top_p": 0}, "evaluation.sampling.top_p = 0: must be greater than 0"),
    ({"evaluation.sampling.top_p": 1.5}, "evaluation.sampling.top_p = 1.5: must be less than or equal to 1"),
    ({"evaluation.sampling.top_k": -1}, "evaluation.sampling.top_k = -1: must be greater than or equal to 0"),
    ({"evaluation.sampling.top_k": 2.5}, "evaluation.sampling.top_k = 2.5 (float): must be a valid integer"),
    ({"evaluation.sampling.top_k": None}, "evaluation.sampling.top_k = None: null is not allowed: "
                                          "transformers reads it as top_k = 50"),
    # choices, each with its allowed values
    ({"dpo.loss": "kto"}, "dpo.loss = 'kto': must be 'sigmoid', 'ipo' or 'hinge'"),
    ({"rpo.distance": "js"}, "rpo.distance = 'js': must be 'bwd_kl', 'fwd_kl' or 'sq'"),
    ({"rpo.reward_source": "gold"}, "rpo.reward_source = 'gold': must be 'reward_model' or 'dataset'"),
    ({"rpo.reward_normalization": "minmax"}, "must be 'none', 'zscore' or 'per_prompt'"),
    ({"evaluation.gold_judge": "gpt4"}, "evaluation.gold_judge = 'gpt4': must be 'vader', 'none' or "
                                        "'hf_classifier'"),
    ({"evaluation.split": "dev"}, "evaluation.split = 'dev': must be 'train', 'val' or 'test'"),
    ({"data_processing.format": "sharegpt"}, "data_processing.format = 'sharegpt': must be 'auto', 'pairs', "
                                             "'hh', 'scored', 'prompts' or 'text'"),
    ({"data_processing.on_invalid": "skip"}, "data_processing.on_invalid = 'skip': must be 'raise' or 'drop'"),
    ({"data_processing.rejected": "best"}, "data_processing.rejected = 'best': must be 'worst' or 'random'"),
    ({"data_processing.columns.prompts": "q"}, "data_processing.columns.prompts = 'prompts': must be 'prompt',"),
    ({"reference.sft.responses": "rejected"}, "reference.sft.responses = 'rejected': must be 'all' or 'chosen'"),
    ({"reward_model.head_input": "pooled"}, "reward_model.head_input = 'pooled': must be 'hidden' or 'logits'"),
    ({"reward_model.compute_dtype": "int8"}, "reward_model.compute_dtype = 'int8': must be 'float32', "),
    ({"reward_model.pooling": "max"}, "reward_model.pooling = 'max': must be 'last' or 'mean'"),
    ({"reward_model.margin_column": "score_difference"},
     "reward_model.margin_column = 'score_difference' needs comparisons: pairs"),
    ({"reward_model.ensemble.members": 0}, "reward_model.ensemble.members = 0"),
    ({"reward_model.ensemble.aggregate": "max"}, "reward_model.ensemble.aggregate = 'max': must be 'mean', "
                                                 "'min' or 'mean_minus_std'"),
    ({"rpo_online.judge": "human"}, "rpo_online.judge = 'human': must be 'reward_model' or 'gold'"),
    ({"rpo_online.refresh.labels_per_round": -1}, "rpo_online.refresh.labels_per_round = -1"),
    ({"evaluation.curve.points": 0}, "evaluation.curve.points = 0"),
    ({"dpo.train.schedule": "step"}, "dpo.train.schedule = 'step': must be 'linear', 'cosine',"),
    ({"rpo.device": "gpu"}, "rpo.device = 'gpu': String should match pattern"),
    ({"data_processing.template": "{prompt} then"}, "data_processing.template = '{prompt} then': template "
                                                    "must contain {prompt} and {response}"),
    # unknown keys at any depth, with the nearest valid key
    ({"dpo.sft_wieght": 0.5}, "dpo.sft_wieght: unknown key; did you mean sft_weight? valid keys here: beta,"),
    ({"dpo.train.learning_rate": 1e-3}, "dpo.train.learning_rate: unknown key; did you mean lr?"),
    ({"evaluation.sampling.nsamples": 2}, "evaluation.sampling.nsamples: unknown key; did you mean n_samples?"),
    ({"reward_model.lora.rank": 8}, "reward_model.lora.rank: unknown key; did you mean r?"),
    ({"dpoo.beta": 0.1}, "dpoo: unknown key; did you mean dpo? valid keys here: base_model, data_processing,"),
    # wrong types (strings are not numbers, numbers are not booleans)
    ({"dpo.train.lr": "1e-3"}, "dpo.train.lr = '1e-3' (str): must be a valid number"),
    ({"dpo.train.steps": 1.5}, "dpo.train.steps = 1.5 (float): must be a valid integer"),
    ({"dpo.disable_dropout": "yes"}, "dpo.disable_dropout = 'yes' (str): must be a valid boolean"),
    ({"reward_model.lora.target_modules": "c_attn"}, "reward_model.lora.target_modules = 'c_attn': must be "
                                                     "'auto' (the architecture's projections), 'all-linear', or"),
    # accepted but ignored settings are errors
    ({"dpo.loss": "ipo", "dpo.label_smoothing": 0.1},
     "dpo.label_smoothing = 0.1 would be ignored: only the sigmoid loss (cDPO) uses it, and loss is 'ipo'"),
    ({"dpo.loss": "hinge", "dpo.label_smoothing": 0.2}, "dpo.label_smoothing = 0.2 would be ignored"),
    ({"evaluation.gold_judge_args.model": "siebert/sentiment-roberta-large-english"},
     "evaluation.gold_judge_args.model = 'siebert/sentiment-roberta-large-english' would be ignored: "
     "gold_judge is 'vader'"),
    ({"evaluation.gold_judge": "hf_classifier"}, "evaluation.gold_judge_args.model is null but gold_judge is "
                                                 "'hf_classifier'"),
    ({"reward_model.load_in_4bit": False, "reward_model.compute_dtype": "bfloat16"},
     "reward_model.compute_dtype = 'bfloat16' would be ignored"),
    ({"base_model.load_args.torch_dtype": "float16"}, "base_model.load_args = {'torch_dtype': 'float16'} would "
                                                      "be ignored: builtin:tiny-gpt2 is built from config"),
    ({"reference.sft.patience": 3}, "reference.sft.patience is 3 but eval_every is 0"),
    ({"reward_model.finetune": "full"}, "reward_model.finetune = 'full' trains every backbone weight, "
                                        "which a 4-bit backbone cannot"),
    ({"reward_model.finetune": "full", "reward_model.load_in_4bit": False,
      "reward_model.ensemble.members": 2}, "reward_model.finetune = 'full' trains one backbone, but "
                                           "ensemble.members is 2"),
    # the builtin model's sizes
    ({"base_model.model.n_head": 5}, "base_model.model.n_embd = 192 is not divisible by n_head = 5"),
    ({"base_model.tokenizer.vocab_size": 100}, "base_model.tokenizer.vocab_size = 100: must be greater than or"),
    ({"reward_model.margin_column": "score_diff"}, "reward_model.margin_column = 'score_diff': must be "
                                                   "'score_difference', 'score_chosen' or 'score_rejected'"),
    # rules between groups
    ({"data_processing.use_chat_template": True}, "data_processing.use_chat_template is true but "
                                                  "builtin:tiny-gpt2 has no chat template"),
    ({"data_processing.max_length": 300}, "data_processing.max_length = 300 exceeds base_model.model.n_positions"),
    ({"evaluation.sampling.max_new_tokens": 200}, "evaluation.sampling.max_new_tokens = 200 plus "
                                                  "data_processing.max_prompt_length = 64 exceeds"),
]


@pytest.mark.parametrize(("overrides", "expected"), RULES, ids=[", ".join(r[0]) for r in RULES])
def test_bad_setting_is_refused_with_its_key_and_reason(overrides, expected):
    message = validation_error(overrides)
    assert expected in message, message
    assert "(1 problem)" in message and "from conf/base + --params" in message


def test_the_hook_refuses_a_bad_setting_when_the_context_is_created(project):
    """The wiring: ``ValidateParameters`` runs on the merged tree when Kedro creates the context."""
    message = context_error(project, {"dpo.beta": -1})
    assert "dpo.beta = -1: must be greater than 0" in message and "from conf/base + --params" in message


def test_every_problem_is_listed_at_once():
    message = validation_error({"dpo.beta": -1, "rpo.eta": -1, "dpo.sft_wieght": 1.0})
    assert "(3 problems)" in message
    assert message.count("\n  - ") == 3


def test_defaults_and_every_shipped_env_are_valid():
    for env in [None, *ENVS]:
        validate_project_params(loaded_params(env=env))
    assert set(GROUPS) == {p.stem.removeprefix("parameters_") for p in (ROOT / "conf/base").glob("parameters_*.yml")}


def test_a_key_missing_from_the_yaml_is_an_error_not_a_default():
    params = base_params("dpo")
    del params["sft_weight"]
    with pytest.raises(ParameterError, match=r"dpo.sft_weight: missing \(every key needs a value in conf/base"):
        DpoParams.parse(params)


def test_valid_overrides_pass_the_hook_and_reach_the_parameters(project):
    params = context_params(project, {"dpo.beta": 0.2, "dpo.loss": "ipo", "evaluation.sampling.top_k": 20})
    assert params["dpo"]["beta"] == 0.2 and params["dpo"]["loss"] == "ipo"
    assert params["evaluation"]["sampling"]["top_k"] == 20


@pytest.mark.parametrize("env", ENVS)
def test_env_with_nested_params_keeps_the_siblings(env):
    """`kedro run --env=<env> --params reference.sft.steps=30,dpo.train.steps=10` changes only those."""
    base = loaded_params(env=env)
    got = loaded_params({"reference.sft.steps": 30, "dpo.train.steps": 10}, env=env)
    assert got["reference"]["sft"] == {**base["reference"]["sft"], "steps": 30}
    assert got["dpo"]["train"] == {**base["dpo"]["train"], "steps": 10}
    assert {k: v for k, v in got.items() if k not in ("reference", "dpo")} == \
        {k: v for k, v in base.items() if k not in ("reference", "dpo")}
    # the env's own values win over base, key by key
    env_files = (ROOT / "conf" / env).glob("parameters_*.yml")
    from omegaconf import OmegaConf

    for f in env_files:
        for group, values in OmegaConf.to_container(OmegaConf.load(f)).items():
            for key, value in values.items():
                if isinstance(value, dict):
                    assert {k: got[group][key][k] for k in value} == value, (env, group, key)
                else:
                    assert got[group][key] == value, (env, group, key)


def test_env_error_names_the_env(project):
    assert "from conf/base + conf/hh_rlhf + --params" in context_error(project, {"dpo.beta": 0}, env="hh_rlhf")


def test_an_impossible_precision_names_its_key_when_the_context_is_created(project):
    """fp16 on a CPU: the hook resolves every stage's precision on its device before anything runs."""
    with pytest.raises(ValueError, match=r"dpo\.train\.precision = 'fp16' needs a CUDA device"):
        context_params(project, {"dpo.train.precision": "fp16", "dpo.device": "cpu"})


def test_cli_refuses_a_bad_setting_before_any_node_runs(project_copy):
    """`kedro run --pipelines=dpo --params dpo.beta=-1`: a clear error in seconds, nothing written."""
    kedro = shutil.which("kedro", path=str(Path(sys.executable).parent)) or "kedro"
    t0 = time.perf_counter()
    proc = subprocess.run([kedro, "run", "--pipelines=dpo", "--params", "dpo.beta=-1,dpo.sft_wieght=0.5"],
                          cwd=project_copy, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "1"})
    seconds = time.perf_counter() - t0
    assert proc.returncode != 0
    out = " ".join((proc.stdout + proc.stderr).split())  # rich wraps long lines
    assert "dpo.beta = -1: must be greater than 0" in out
    assert "dpo.sft_wieght: unknown key; did you mean sft_weight?" in out
    assert seconds < 60, seconds
    assert not any((project_copy / "data" / "02_intermediate").iterdir())  # no node ran
    assert not (project_copy / "mlflow.db").exists()  # no MLflow run was opened


def _fake_hub_cache(root: Path, hub_id: str, sha: str = "c" * 40) -> None:
    """``hub_id`` as the Hugging Face cache holds a downloaded snapshot (its config.json)."""
    repo = root / f"models--{hub_id.replace('/', '--')}"
    (repo / "snapshots" / sha).mkdir(parents=True)
    (repo / "snapshots" / sha / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


@pytest.mark.parametrize("key", ["reward_model.backbone", "base_model.name_or_path"])
def test_a_hub_id_offline_and_uncached_is_refused_before_any_node_runs_naming_the_key(
        project, empty_hub_cache, monkeypatch, key):
    """With the Hub switched off (HF_HUB_OFFLINE, as `make` sets it) a Hub id that is not in the
    local cache fails when the Kedro context is created, naming the key and what it needs."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = " ".join(context_error(project, {key: "org/not-downloaded"}).split())
    assert f"{key} = 'org/not-downloaded' is a Hugging Face Hub id that is not in the local" in message
    assert "HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set: this run needs the model locally or network access" \
        in message
    assert not (project / "data").exists()  # nothing ran


def test_a_hub_id_with_the_hub_unreachable_is_refused_and_a_cached_one_passes(project, empty_hub_cache,
                                                                             monkeypatch):
    from rpo_pipeline import sources

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(sources, "hub_reachable", lambda timeout_s=3.0: False)
    message = " ".join(context_error(project, {"reward_model.backbone": "org/elsewhere"}).split())
    assert "reward_model.backbone = 'org/elsewhere'" in message and "huggingface.co cannot be reached" in message
    _fake_hub_cache(empty_hub_cache, "org/tiny")
    params = context_params(project, {"reward_model.backbone": "org/tiny"})  # in the cache: no network needed
    assert params["reward_model"]["backbone"] == "org/tiny"
    assert sources.unavailable_models({"reward_model": {"backbone": "sft"}, "base_model": {
        "name_or_path": "builtin:tiny-gpt2"}}) == []  # not Hub ids
