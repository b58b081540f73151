"""The trained policies and the reward model as MLflow Models (pyfunc), and the kedro-mlflow flavor
that logs and registers them.

Kedro-free. A node hands the catalog a ``ModelBundle`` (the model's local directories, its text
format and generation or scoring settings, and the tags for its registered version). The catalog
entry is a kedro-mlflow ``MlflowModelTrackingDataset`` with ``flavor: rpo_pipeline.mlflow_models``,
which calls ``log_model`` below with the entry's ``save_args``:

.. code-block:: yaml

    "{method}.mlflow_model":
      type: kedro_mlflow.io.models.MlflowModelTrackingDataset
      flavor: rpo_pipeline.mlflow_models
      save_args:
        name: "{method}_policy"
        registered_model_name: "rpo_pipeline.{method}_policy"

``log_model`` logs a pyfunc whose artifacts are the ``save_pretrained`` directories (safetensors),
with a signature and an input example, registers it and tags the new version with the bundle's
tags and the run that produced it. The ``rpo_pipeline`` package travels with it as code
(``code_paths``), so loading needs neither the project, its data folder, nor an install of it:

.. code-block:: python

    import mlflow, pandas as pd
    policy = mlflow.pyfunc.load_model("models:/rpo_pipeline.dpo_policy/latest")
    policy.predict(pd.DataFrame({"prompt": ["This movie"]}), params={"temperature": 0.7})
    rm = mlflow.pyfunc.load_model("models:/rpo_pipeline.reward_model/latest")
    rm.predict(pd.DataFrame({"prompt": ["This movie"], "response": ["was a delight."]}))

A policy returns one row per prompt and sample (``prompt``, ``sample``, ``completion``), sampled
with the settings saved with it (the evaluation's), which ``params`` override. The reward model
returns ``score`` per (prompt, response) row, formatted and tokenized exactly as the pipeline's
``tokenized_examples`` (so its scores are the pipeline's ``reward_scores``); its 4-bit backbone is
rebuilt from the bundled full-precision weights on load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from rpo_pipeline.evaluation import generate
from rpo_pipeline.params import SamplingConfig
from rpo_pipeline.reward_model import RewardModel, ensemble_reward, score
from rpo_pipeline.text_format import format_groups, format_prompts, tokenize_examples, tokenize_prompts

POLICY, REWARD_MODEL = "policy", "reward_model"
_PARAM_TYPES = {int: "long", float: "double"}
# what the pyfuncs import; the rpo_pipeline package itself travels as the model's code
REQUIREMENTS = ("torch", "transformers", "tokenizers", "peft", "bitsandbytes", "accelerate",
                "safetensors", "pandas", "numpy", "pydantic", "tqdm")


@dataclass
class ModelBundle:
    """What a node hands to the catalog: ``kind`` (``policy`` | ``reward_model``), ``artifacts``
    (name -> local ``save_pretrained`` directory), ``config`` (the pyfunc's ``model_config``: text
    format and sampling or scoring settings) and ``tags`` for the registered version."""

    kind: str
    artifacts: dict[str, str]
    config: dict[str, Any]
    tags: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        need = {POLICY: {"policy", "tokenizer"}, REWARD_MODEL: {"reward_model", "tokenizer"}}
        if self.kind not in need:
            raise ValueError(f"ModelBundle.kind must be one of {sorted(need)}, got {self.kind!r}")
        if missing := need[self.kind] - set(self.artifacts):
            raise ValueError(f"a {self.kind} bundle needs artifacts {sorted(missing)}")


def text_format(data_processing: Any) -> dict[str, Any]:
    """The prompt template and truncation of ``data_processing`` (a ``DataProcessingParams``), as
    the pyfuncs apply them."""
    return {k: getattr(data_processing, k) for k in ("template", "use_chat_template",
                                                     "max_prompt_length", "max_length")}


def _groups(model_input: pd.DataFrame, responses: list[list[str]]) -> pd.DataFrame:
    """Input rows as canonical groups (one group per row), as ``text_format`` formats them."""
    if "prompt" not in model_input.columns:
        raise ValueError(f"the input needs a 'prompt' column, got {list(model_input.columns)}")
    n = len(model_input)
    return pd.DataFrame({"group_id": [str(i) for i in range(n)], "split": [None] * n,
                         "prompt": model_input["prompt"].astype(str).tolist(),
                         "prompt_messages": [None] * n, "responses": responses})


class PolicyModel(mlflow.pyfunc.PythonModel):
    """prompt -> ``n_samples`` completions, with the pipeline's prompt template and sampler
    (``evaluation.generate``)."""

    def load_context(self, context) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer  # in the serving process, on load

        self.config = context.model_config
        self.tokenizer = AutoTokenizer.from_pretrained(context.artifacts["tokenizer"])
        self.model = AutoModelForCausalLM.from_pretrained(context.artifacts["policy"]).eval()

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
                ) -> pd.DataFrame:
        fmt, tok = self.config["text_format"], self.tokenizer
        cfg = SamplingConfig.model_validate({**self.config["sampling"], **(params or {})})
        groups = _groups(model_input, [[] for _ in range(len(model_input))])
        prompts = tokenize_prompts(
            format_prompts(groups, fmt["template"], fmt["use_chat_template"], tok), tok,
            fmt["max_prompt_length"], chat_template=fmt["use_chat_template"])
        completions, _ = generate(self.model, prompts["prompt_ids"].tolist(), cfg, tok.eos_token_id,
                                  tok.pad_token_id, device=self.config.get("device", "auto"),
                                  progress=False)
        rows = [(p, s, tok.decode(c, skip_special_tokens=True).strip())
                for p, comps in zip(groups["prompt"], completions, strict=True)
                for s, c in enumerate(comps)]
        return pd.DataFrame(rows, columns=["prompt", "sample", "completion"])


class RewardModelPyfunc(mlflow.pyfunc.PythonModel):
    """(prompt, response) -> the reward model's score, formatted and tokenized as
    ``tokenized_examples`` is."""

    def load_context(self, context) -> None:
        from transformers import AutoTokenizer  # in the serving process, on load

        self.config = context.model_config
        self.tokenizer = AutoTokenizer.from_pretrained(context.artifacts["tokenizer"])
        self.model = RewardModel.from_pretrained(
            context.artifacts["reward_model"], device=self.config.get("device", "cpu"),
            backbone_path=context.artifacts.get("backbone"))

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
                ) -> pd.DataFrame:
        if "response" not in model_input.columns:
            raise ValueError(f"the input needs 'prompt' and 'response' columns, got "
                             f"{list(model_input.columns)}")
        fmt, tok = self.config["text_format"], self.tokenizer
        groups = _groups(model_input, [[str(r)] for r in model_input["response"]])
        examples = tokenize_examples(
            format_groups(groups, fmt["template"], fmt["use_chat_template"], tok), tok,
            fmt["max_prompt_length"], fmt["max_length"], chat_template=fmt["use_chat_template"])
        members = score(self.model, examples["input_ids"].map(list).tolist(),
                       examples["response_start"].tolist(),
                       batch_size=int((params or {}).get("batch_size", self.config["batch_size"])))
        mean, std = ensemble_reward(members)
        return pd.DataFrame({"score": mean, "score_std": std})


def signature(bundle: ModelBundle) -> ModelSignature:
    """Inputs, outputs and (policies: the sampling settings, reward model: batch size) params."""
    if bundle.kind == POLICY:
        sampling = bundle.config["sampling"]
        return ModelSignature(
            inputs=Schema([ColSpec("string", "prompt")]),
            outputs=Schema([ColSpec("string", "prompt"), ColSpec("long", "sample"),
                            ColSpec("string", "completion")]),
            params=ParamSchema([ParamSpec(k, _PARAM_TYPES[type(v)], v) for k, v in sampling.items()]))
    return ModelSignature(inputs=Schema([ColSpec("string", "prompt"), ColSpec("string", "response")]),
                          outputs=Schema([ColSpec("double", "score"), ColSpec("double", "score_std")]),
                          params=ParamSchema([ParamSpec("batch_size", "long",
                                                        int(bundle.config["batch_size"]))]))


def data_example(groups: pd.DataFrame) -> dict[str, str]:
    """The logged input example, from the data: the first test prompt (else the first prompt) and
    its first response."""
    rows = groups[groups["split"] == "test"] if (groups["split"] == "test").any() else groups
    first = rows.iloc[0]
    return {"example_prompt": str(first["prompt"]), "example_response": str(list(first["responses"])[0])}


def input_example(bundle: ModelBundle) -> pd.DataFrame:
    prompt = bundle.config["example_prompt"]
    if bundle.kind == POLICY:
        return pd.DataFrame({"prompt": [prompt]})
    return pd.DataFrame({"prompt": [prompt], "response": [bundle.config["example_response"]]})


def _requirements() -> list[str]:
    out = []
    for name in REQUIREMENTS:
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            out.append(name)
    return out


def log_model(bundle: ModelBundle, name: str, registered_model_name: str | None = None,
              **kwargs: Any):
    """``mlflow.pyfunc.log_model`` of the bundle (in the active run), registered as
    ``registered_model_name`` with the bundle's tags and ``run_id`` on the new version; the
    ``ModelInfo``. The flavor entry point kedro-mlflow's ``MlflowModelTrackingDataset`` calls."""
    python_model = PolicyModel() if bundle.kind == POLICY else RewardModelPyfunc()
    info = mlflow.pyfunc.log_model(
        name=name, python_model=python_model, artifacts=bundle.artifacts, model_config=bundle.config,
        signature=signature(bundle), input_example=input_example(bundle),
        pip_requirements=_requirements(), code_paths=[str(Path(__file__).parent)],
        registered_model_name=registered_model_name, **kwargs)
    if registered_model_name:
        client = mlflow.MlflowClient()
        ver = str(info.registered_model_version)
        for key, value in {**bundle.tags, "run_id": info.run_id}.items():
            client.set_model_version_tag(registered_model_name, ver, key, str(value))
    return info


def load_model(model_uri: str, **kwargs: Any):
    """The pyfunc at ``model_uri`` (``models:/<name>/<version>``, ``runs:/...``)."""
    return mlflow.pyfunc.load_model(model_uri, **kwargs)
